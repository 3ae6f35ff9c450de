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
    report: Any,
    batches: Sequence[Mapping[str, torch.Tensor]],
    tokenizer: Any = None,
    error_batches: Sequence[Mapping[str, torch.Tensor]] | None = None,
    model_name: str | None = None,
    title: str | None = None,
    progress: bool = False,
    overwrite: bool = False,
) -> tuple[pathlib.Path, pathlib.Path]:
    """Measure and write the audit report of ``qmodel, report = outlierfx.quantize(model, ...)``,
    from the graphs the run kept (nothing is captured or re-run):

    - outliers of the captured graph over ``batches`` (use the calibration batches; for a causal
      LM quantized for generation, in the cache's form: ``[prefill_inputs(model.config, b) for b
      in batches]``, :func:`~outlierfx.graph.kv_cache.prefill_inputs`), and of the final graph
      with its quantizers off, where the recipe rewrote anything (gamma migration,
      Quadapter scales folded into norms and weights...);
    - per-tensor quantization error of the fake-quant graph over ``error_batches`` (default
      ``batches``);
    - the run's quality and latency, where measured (``report.with_measurements``).

    A ``quantize(..., low_memory=True)`` run kept graphs without weights: its report has the
    audit trail and the measurements only (no outlier or per-tensor error sections).

    Returns the paths of ``report.html`` and ``report.json`` in ``out_dir``.
    """
    from ..analysis import analyze_outliers
    from ..errors import DataError
    from ..graph import meta
    from ..quantizers.observers import quantizers_disabled
    from ..quantizers.qerror import quantization_errors

    if getattr(report, "graphs", None) is None:
        raise DataError("this report carries no graphs (it was loaded or built by hand); build the audit report "
                        "from the report outlierfx.quantize() returned")
    batches = list(batches)
    captured, simulated = report.graphs.captured, report.graphs.simulated
    if meta.GM_WEIGHT_SOURCE in captured.meta:  # a low-memory run: its graphs hold no weights to run
        return write_report(out_dir, report=report, quality=report.quality, speed=report.latency, title=title,
                            model_name=model_name, overwrite=overwrite)
    before = analyze_outliers(captured, batches, tokenizer, progress=progress)
    rewrites = [e.pass_name for e in report.audit if e.modified and e.pass_name in REWRITE_PASSES]
    after = None
    if rewrites:
        with quantizers_disabled(simulated):
            after = analyze_outliers(simulated, batches, tokenizer, progress=progress)
    label = ("after " + " + ".join(rewrites) + " (quantizers off)") if rewrites else "no rewrite before quantization"
    errors = quantization_errors(simulated, list(error_batches) if error_batches is not None else batches)
    return write_report(out_dir, report=report, outliers_before=before, outliers_after=after, quant_errors=errors,
                        quality=report.quality, speed=report.latency, title=title, model_name=model_name,
                        after_label=label, overwrite=overwrite)


# Passes that rewrite the float model (the rest place, calibrate, clip or round quantizers).
REWRITE_PASSES = ("MigrateGamma", "RotateResidual", "InsertQuadapter", "FoldQuadapter")
