"""The audit report of a quantization run: one self-contained HTML file plus JSON.

``write_report`` renders parts the caller already has; ``build_report`` measures them first
(outliers before and after the recipe's rewrites, per-tensor quantization error) and writes the
report. ``screenshot`` renders the HTML in headless Chromium.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .browser import find_chromium, screenshot
from .html import HTML_NAME, JSON_NAME, render_html, report_data, write_report

__all__ = ["HTML_NAME", "JSON_NAME", "build_report", "find_chromium", "render_html", "report_data", "screenshot",
           "write_report"]


def build_report(
    out_dir: str | os.PathLike,
    *,
    model: torch.nn.Module,
    qmodel: torch.fx.GraphModule,
    report: Any,
    batches: Sequence[Mapping[str, torch.Tensor]],
    tokenizer: Any = None,
    error_batches: Sequence[Mapping[str, torch.Tensor]] | None = None,
    quality: Mapping[str, Any] | None = None,
    speed: Mapping[str, Any] | None = None,
    model_name: str | None = None,
    title: str | None = None,
    progress: bool = False,
    overwrite: bool = False,
) -> tuple[pathlib.Path, pathlib.Path]:
    """Measure and write the audit report of ``qmodel, report = outlierfx.quantize(model, ...)``.

    - outliers of the captured ``model`` over ``batches`` (use the calibration batches), and
      after the recipe's rewrite passes (``Recipe.prepare``; none for ``naive``, ``peg``...);
    - per-tensor quantization error of the fake-quantized ``qmodel`` over ``error_batches``
      (default ``batches``);
    - ``quality`` / ``speed`` tables as given.

    Returns the paths of ``report.html`` and ``report.json`` in ``out_dir``.
    """
    from ..analysis import analyze_outliers
    from ..graph import capture
    from ..passes import PassManager
    from ..passes.recipes import get_recipe
    from ..quantizers.qerror import quantization_errors

    batches = list(batches)
    gm = capture(model, dict(batches[0]))
    before = analyze_outliers(gm, batches, tokenizer, progress=progress)
    rewrites = get_recipe(report.recipe).prepare()
    after = None
    if rewrites:
        rewritten = PassManager(rewrites)(gm).graph_module
        after = analyze_outliers(rewritten, batches, tokenizer, progress=progress)
    label = "after " + " + ".join(type(p).__name__ for p in rewrites) if rewrites else "after the recipe's rewrites"
    errors = quantization_errors(qmodel, list(error_batches) if error_batches is not None else batches)
    return write_report(out_dir, report=report, outliers_before=before, outliers_after=after, quant_errors=errors,
                        quality=quality, speed=speed, title=title, model_name=model_name, after_label=label,
                        overwrite=overwrite)
