"""``outlierfx bench accuracy``: quality of each recipe x bit width against FP32."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from typing import Any

import torch

from . import corpus
from .api import quantize
from .evaluate import DecoderEval, EncoderEval
from .models import load
from .quantizers.policy import parse_bits
from .recipes import Recipe

# decoders: passages of >= 200 words fill most 256-token windows (one paragraph each held 111
# SmolLM2 tokens on average: 3,565 real tokens in 32 windows)
CALIBRATION = {"encoder": {"samples": 64, "max_length": 128, "batch": 8, "min_words": 0},
               "decoder": {"samples": 32, "max_length": 256, "batch": 4, "min_words": 200}}


def calibration_batches(loaded, samples: int, max_length: int, batch: int,
                        min_words: int = 0) -> list[dict[str, torch.Tensor]]:
    """Batches of the packaged Wikipedia calibration split (``samples`` passages spread over its
    articles, each of at least ``min_words`` words where the article has them)."""
    texts = corpus.wikipedia_sample("calibration", samples, min_words)
    return corpus.calibration_batches(loaded, texts, max_length, batch, min_tokens=0,
                                      source="the Wikipedia calibration split")


def load_with_calibration(model_name: str):  # -> (LoadedModel, batches)
    """A packaged (or local) model and its benchmark calibration batches (``CALIBRATION``)."""
    loaded = load(model_name)
    return loaded, calibration_batches(loaded, **CALIBRATION[loaded.kind])


def accuracy(model_name: str, bits: Sequence[str], recipes: Sequence[str | Recipe], policy: str | None = None,
             backend: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Quality of each recipe (a name, a preset, or a :class:`~outlierfx.recipes.Recipe`) at each
    bit width against FP32; simulated unless ``backend`` is given (presets: lowered to this CPU's
    best backend unless ``backend="fake-quant"``)."""
    loaded, batches = load_with_calibration(model_name)
    evaluator = EncoderEval.build(loaded) if loaded.kind == "encoder" else DecoderEval.build(loaded)
    model = loaded.model.eval()
    reference = evaluator.embeddings(model) if loaded.kind == "encoder" else None
    rows = [{"model": model_name, "recipe": "fp32", "bits": "FP32", "backend": "fake-quant",
             "metrics": evaluator.metrics(model, None)}]
    if progress:
        print(_format_row(rows[0]), flush=True)
    for width in bits:
        for recipe in recipes:
            start = time.perf_counter()
            qmodel, report = quantize(model, batches, recipe=recipe, bits=width, policy=policy, backend=backend,
                                      generation=False, progress=False)  # a decoder scores fixed windows in one pass
            metrics = evaluator.metrics(qmodel, reference)
            metrics["calibration_s"] = round(report.calibration_seconds, 2)
            metrics["quantize_s"] = round(time.perf_counter() - start, 2)
            row = {"model": model_name, "recipe": report.recipe, "bits": str(parse_bits(width)),
                   "backend": report.backend, "policy": report.policy, "metrics": metrics}
            if report.preset:
                row["preset"] = report.preset
            rows.append(row)
            if progress:
                print(_format_row(row), flush=True)
    env = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
           "calibration": CALIBRATION[loaded.kind], "calibration_text": "wikipedia calibration split"}
    return {"rows": rows, "env": env}


def _format_row(row: dict[str, Any]) -> str:
    metrics = "  ".join(f"{k}={v:.4f}" if isinstance(v, float) and k not in ("calibration_s", "quantize_s")
                        else f"{k}={v}" for k, v in row["metrics"].items())
    return f"{row['model']:8} {row['recipe']:8} {row['bits']:6} {row.get('policy', ''):13} {metrics}"


def print_table(result: dict[str, Any]) -> None:
    rows = result["rows"]
    keys = [k for k in rows[0]["metrics"]]
    width = max(8, *(len(row["recipe"]) for row in rows))  # suffixed names (smooth-peg+sink) stay aligned
    print(f"{'model':8} {'recipe':{width}} {'bits':6} " + " ".join(f"{k:>10}" for k in keys) + f" {'calib s':>8}")
    for row in rows:
        m = row["metrics"]
        cal = m.get("calibration_s", "")
        print(f"{row['model']:8} {row['recipe']:{width}} {row['bits']:6} " + " ".join(f"{m[k]:10.4f}" for k in keys)
              + f" {cal:>8}")


def write_json(result: dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def show_and_write(result: dict[str, Any], path: str | None) -> None:
    """The result's table after a blank line, and its JSON at ``path`` (None: not written)."""
    print()
    print_table(result)
    if path:
        write_json(result, path)
        print(f"wrote {path}")
