"""One call of a lowered int8 model (the preset on onednn) timed from many Python stack depths,
with and without the library's data-stack headroom (``outlierfx/stack_headroom.py``): the
median and worst milliseconds and page faults a call over the depths, and at how many depths
a call takes more than ``THRASH_FAULTS`` faults above the median.

- ``--model minilm``: the lowered encoder on one short query (1 x 16 tokens), called through
  ``call_with_stack_headroom`` or directly (as a user's own loop calls it: "without").
- ``--model smollm2``: one decode step after 256 cached tokens, as ``generate`` runs it;
  "without" calls the cache graph without ``call_with_stack_headroom``.

Run it alone on the machine (two torch processes on 2 cores slow each other):

    PYTHONPATH=$PWD .venv/bin/python bench/scripts/stack_depth_sweep.py --model minilm --json out.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from collections.abc import Callable

import torch

import outlierfx
from outlierfx import generation
from outlierfx.benchmarks import load_with_calibration
from outlierfx.corpus import wikipedia_sample
from outlierfx.decode_speed import CachedDecodeStep
from outlierfx.evaluate import DecoderEval
from outlierfx.models import encode
from outlierfx.stack_headroom import call_with_stack_headroom

DEPTHS = range(0, 330, 3)  # caller depths: more than two 16 KB chunks of ~100-byte frames
CALLS = 7  # timed calls per depth (median)
# A depth thrashes where a call takes this many more page faults than at the sweep's median depth:
# one per short Python call, where a call makes hundreds (a mapping of its own takes 2-3 a call)
THRASH_FAULTS = 20


def _at_depth(depth: int, fn: Callable[[], tuple[float, float]]) -> tuple[float, float]:
    return _at_depth(depth - 1, fn) if depth else fn()


def sweep(call: Callable[[], object], variants: dict[str, Callable[[], None]]) -> dict[str, dict[str, float]]:
    """Per variant (a function that switches ``call`` to it), the summary over ``DEPTHS``; the
    variants alternate at every depth, so drift in the machine's speed hits them alike."""
    def timed() -> tuple[float, float]:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        times = []
        for _ in range(CALLS):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / CALLS

    results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    with torch.no_grad():
        for switch in variants.values():
            switch()
            for _ in range(3):
                call()
        for depth in DEPTHS:
            for name, switch in variants.items():
                switch()
                results[name].append(_at_depth(depth, timed))
    summary = {}
    for name, rows in results.items():
        ms, faults = [r[0] for r in rows], [r[1] for r in rows]
        summary[name] = {"median_ms": round(statistics.median(ms), 3), "worst_ms": round(max(ms), 3),
                         "median_faults": statistics.median(faults), "worst_faults": max(faults),
                         "thrashing_depths": sum(f > statistics.median(faults) + THRASH_FAULTS for f in faults),
                         "depths": len(rows)}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    loaded, batches = load_with_calibration(args.model)
    qmodel, report = outlierfx.quantize(loaded.model, batches, backend="onednn", progress=False)
    if args.model == "minilm":
        query = encode(loaded, wikipedia_sample("evaluation", 1), 16)
        direct = lambda: qmodel(**query)  # noqa: E731
        target = {"call": direct}
        rows = sweep(lambda: target["call"](),
                     {"with headroom": lambda: target.update(call=lambda: call_with_stack_headroom(direct)),
                      "without": lambda: target.update(call=direct)})
    else:
        ids = DecoderEval.build(loaded).wiki[:2].reshape(1, -1)[:, :257]  # held-out text, 256 cached + 1
        step = CachedDecodeStep(qmodel, ids)
        headroom = generation.call_with_stack_headroom
        try:
            rows = sweep(step, {"with headroom": lambda: setattr(generation, "call_with_stack_headroom", headroom),
                                "without": lambda: setattr(generation, "call_with_stack_headroom",
                                                           lambda fn, *a, **k: fn(*a, **k))})
        finally:
            generation.call_with_stack_headroom = headroom
    for name, row in rows.items():
        print(f"{name:14s} {json.dumps(row)}", flush=True)
    call = "one query 1 x 16" if args.model == "minilm" else "one decode step, 256 cached"
    with open(args.json, "w") as f:
        json.dump({"rows": [{"model": args.model, "recipe": f"{report.recipe}, {name}", "bits": "W8A8",
                             "backend": "onednn", "metrics": row} for name, row in rows.items()],
                   "env": {"call": call, "calls_per_depth": CALLS, "threads": torch.get_num_threads(),
                           "depths": f"{DEPTHS.start}..{DEPTHS.stop - 1} step {DEPTHS.step}"}}, f, indent=2)


if __name__ == "__main__":
    main()
