"""Regenerate docs/report-screenshot.png: quantize the packaged MiniLM as ``quantize()`` does by
default (the ``fast`` preset on this CPU's best backend; its folded Quadapter scales show in the
outlier plots' before/after), measure quality and latency against FP32, write the audit report and
render it in headless Chromium (scripts/setup-browser.sh installs it).

    .venv/bin/python scripts/report_screenshot.py [--recipe NAME] [--backend NAME] [--out DIR]
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import tempfile

import outlierfx
from outlierfx.benchmarks import CALIBRATION, calibration_batches
from outlierfx.measure import measure
from outlierfx.models import load
from outlierfx.report import build_report, screenshot

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=None, help="default: the fast preset")
    parser.add_argument("--backend", default=None, help="default: this CPU's best")
    parser.add_argument("--bits", default="W8A8")
    parser.add_argument("--out", help="keep the report here (default: a temporary folder)")
    args = parser.parse_args()
    loaded = load("minilm")
    batches = calibration_batches(loaded, **CALIBRATION["encoder"])
    backend = args.backend or outlierfx.default_backend()
    qmodel, report = outlierfx.quantize(loaded.model, batches, recipe=args.recipe, bits=args.bits, backend=backend)
    measured = measure(loaded, qmodel, f"int8 ({report.backend})", rounds=5)
    report = report.with_measurements(quality=measured.quality, latency=measured.latency)
    out = pathlib.Path(args.out) if args.out else pathlib.Path(tempfile.mkdtemp(prefix="outlierfx-report-"))
    html_path, _ = build_report(out, report=report, batches=batches[:4], tokenizer=loaded.tokenizer,
                                model_name="minilm", progress=True)
    png = screenshot(html_path, out / "report.png", width=1280, height=4000)
    target = ROOT / "docs" / "report-screenshot.png"
    shutil.copyfile(png, target)
    print(f"wrote {html_path} and {target}")


if __name__ == "__main__":
    main()
