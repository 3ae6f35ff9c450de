"""Resident memory over one ``quantize()`` run: RSS before and after every pass, the peak in
between, and the process's peak (``ru_maxrss``). What issue 28's ``--low-memory`` target is a
fraction of, and where a run's memory goes.

    .venv/bin/python bench/scripts/quantize_memory.py [--model smollm2] [--samples 64] [--backend onednn]

RSS does not depend on machine load, so unlike timings this can run beside other work. A sampler
thread reads /proc/self/statm every 50 ms: a peak shorter than that can be missed by the per-pass
column, never by ``ru_maxrss``.
"""

from __future__ import annotations

import argparse
import resource
import threading
import time

from outlierfx import corpus, quantize
from outlierfx.models import load
from outlierfx.passes import base


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--samples", type=int, default=64, help="calibration paragraphs (the CLI's default)")
    parser.add_argument("--backend", default="onednn")
    args = parser.parse_args()
    start, peak = time.perf_counter(), [0.0]

    def mark(what: str) -> None:
        now = rss_mb()
        print(f"{time.perf_counter() - start:7.1f}s  rss {now:6.0f} MB  peak since last line {peak[0]:6.0f} MB  {what}",
              flush=True)
        peak[0] = now

    def sample() -> None:
        while True:
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.05)

    loaded = load(args.model)  # before the sampler starts: imports under a second thread are slow
    threading.Thread(target=sample, daemon=True).start()
    mark(f"{args.model} loaded")
    batches = corpus.calibration_batches(loaded, corpus.wikipedia_sample("calibration", args.samples))
    original = base.GraphPass.__call__

    def traced(self: base.GraphPass, gm):  # type: ignore[no-untyped-def]
        mark(f"before {self.name}")
        result = original(self, gm)
        mark(f"after {self.name}")
        return result

    base.GraphPass.__call__ = traced  # type: ignore[method-assign]
    qmodel, _ = quantize(loaded.model, batches, backend=args.backend, progress=False)
    mark("quantize() returned")
    print(f"peak RSS of the process (ru_maxrss): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
