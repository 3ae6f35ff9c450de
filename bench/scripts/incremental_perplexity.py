"""SmolLM2's int8 generating model (the ``fast`` preset) scored two ways on held-out Wikipedia
windows: in one call per window (full-sequence, teacher forced) and through its KV cache one
token per call, as generation computes it (``incremental_perplexity``). Issue 26 asks for the two
within 0.5%. ``bench speed`` reports both on 2 windows; this takes more.

    .venv/bin/python bench/scripts/incremental_perplexity.py --windows 8 --backends onednn \\
        --json bench/results/smollm2/incremental-perplexity.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from outlierfx import corpus
from outlierfx.api import quantize
from outlierfx.benchmarks import CALIBRATION, calibration_batches
from outlierfx.evaluate import DecoderEval, token_windows
from outlierfx.generation import incremental_perplexity
from outlierfx.models import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--backends", default="onednn")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    loaded = load("smollm2")
    batches = calibration_batches(loaded, **CALIBRATION["decoder"])
    windows = token_windows(loaded, corpus.wikipedia("evaluation"), 256, args.windows)
    rows = []
    for backend in args.backends.split(","):
        lm, report = quantize(loaded.model.eval(), batches, backend=backend, tokenizer=loaded.tokenizer, progress=False)
        start = time.perf_counter()
        full = DecoderEval.perplexity(lm, windows, batch=1)
        incremental = incremental_perplexity(lm, windows)
        row = {"model": "smollm2", "recipe": report.recipe, "bits": report.bits, "backend": backend,
               "metrics": {"ppl_full": round(full, 4), "ppl_incremental": round(incremental, 4),
                           "incremental_vs_full": round(incremental / full, 5),
                           "seconds": round(time.perf_counter() - start, 1)}}
        rows.append(row)
        print(row, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "env": {"torch": torch.__version__, "threads": 2, "windows": args.windows,
                                               "window": 256, "text": "wikipedia evaluation split"}}, f, indent=1)


if __name__ == "__main__":
    main()
