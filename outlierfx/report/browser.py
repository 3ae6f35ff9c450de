"""Render an HTML file with headless Chromium (Debian's ``chromium``; ``scripts/setup-browser.sh``
installs it) to prove it opens and shows its plots."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import tempfile

from ..errors import OutlierFXError

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """Path of a Chromium binary on PATH (``$OUTLIERFX_CHROMIUM`` first), or None."""
    for name in (os.environ.get("OUTLIERFX_CHROMIUM"), *CANDIDATES):
        if name and (found := shutil.which(name)):
            return found
    return None


def screenshot(html_path: str | os.PathLike, png_path: str | os.PathLike, *, width: int = 1280,
               height: int = 4000, timeout: float = 120.0) -> pathlib.Path:
    """Open ``html_path`` in headless Chromium (a fresh profile, no network services) and save a
    ``width`` x ``height`` screenshot of the page to ``png_path``."""
    binary = find_chromium()
    if binary is None:
        raise OutlierFXError("no Chromium found to render the report; run scripts/setup-browser.sh "
                             "(Debian package 'chromium') or set OUTLIERFX_CHROMIUM")
    page = pathlib.Path(html_path).resolve()
    png = pathlib.Path(png_path).resolve()
    with tempfile.TemporaryDirectory(prefix="outlierfx-chromium-") as profile:
        command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={png}",
                   f"--window-size={width},{height}", page.as_uri()]
        try:
            result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise OutlierFXError(f"Chromium did not render {page} within {timeout:.0f} s") from exc
    if result.returncode != 0 or not png.is_file():
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise OutlierFXError(f"Chromium failed to render {page} (exit {result.returncode}): {tail[0]}")
    return png
