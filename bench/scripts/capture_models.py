"""Load and capture each packaged real model; print load/export/canonicalize times and the error.

    .venv/bin/python bench/scripts/capture_models.py [--json bench/results/<model>/capture.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import outlierfx
from outlierfx import corpus
from outlierfx.graph import meta
from outlierfx.models import PACKAGED_MODELS, encode, load


def measure(name: str, batch: int, seq: int) -> dict:
    loaded = load(name)
    texts = corpus.wikipedia("evaluation")[:batch]
    inputs = encode(loaded, texts, seq)
    start = time.perf_counter()
    gm = outlierfx.capture(loaded.model, inputs)
    capture_s = time.perf_counter() - start
    report = gm.meta[meta.GM_CAPTURE_REPORT]
    return {
        "model": name,
        "batch": list(inputs["input_ids"].shape),
        "load_s": round(loaded.load_seconds, 2),
        "capture_s": round(capture_s, 2),
        "export_s": round(report.export_seconds, 2),
        "canonicalize_s": round(report.canonicalize_seconds, 2),
        "nodes": report.num_nodes,
        "max_abs_error": report.error.max_abs,
        "max_rel_error": report.error.max_rel,
        "op_counts": dict(report.op_counts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = [measure(name, args.batch, args.seq) for name in PACKAGED_MODELS]
    print(f"{'model':8} {'tokens':>9} {'load s':>7} {'capture s':>9} {'export s':>8} {'nodes':>6} "
          f"{'max|err|':>9} {'rel err':>8}")
    for r in rows:
        print(f"{r['model']:8} {'x'.join(map(str, r['batch'])):>9} {r['load_s']:7.2f} {r['capture_s']:9.2f} "
              f"{r['export_s']:8.2f} {r['nodes']:6d} {r['max_abs_error']:9.2e} {r['max_rel_error']:8.1e}")
    if args.json:
        env = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads()}
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "env": env}, f, indent=2)


if __name__ == "__main__":
    main()
