"""The ``outlierfx`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from .errors import OutlierFXError


def _demo(args: argparse.Namespace) -> int:
    import torch

    from . import corpus
    from .graph import capture, meta
    from .graph.view import GraphView
    from .models import load

    torch.manual_seed(0)
    print("outlierfx demo: capture the packaged all-MiniLM-L6-v2 and map its structure")
    loaded = load("minilm")
    print(f"  loaded {loaded.name} in {loaded.load_seconds:.1f}s")
    sentences = corpus.wikipedia("calibration")[: args.batch]
    inputs = dict(loaded.tokenizer(sentences, return_tensors="pt", padding=True, truncation=True, max_length=args.seq))
    start = time.perf_counter()
    gm = capture(loaded.model, inputs)
    report = gm.meta[meta.GM_CAPTURE_REPORT]
    print(f"  captured in {time.perf_counter() - start:.1f}s (export {report.export_seconds:.1f}s): "
          f"{report.num_nodes} nodes; max |error| vs the model {report.error.max_abs:.2e} "
          f"({report.error.max_rel:.1e} of max |output|) on {tuple(inputs['input_ids'].shape)} tokens")
    rewrites = ", ".join(f"{k} x{v}" for k, v in report.rewrites.items() if v)
    print(f"  canonicalization: {rewrites}")
    print("  canonical ops: " + ", ".join(f"{k}={v}" for k, v in report.op_counts.items() if v))
    view = GraphView(gm)
    print("\n".join("  " + line for line in view.describe().splitlines()))
    print(f"  residual stream: {len(view.residual_stream)} tensors "
          f"({sum(1 for s in view.norm_sites if s.is_post_ln)} norms also feed a residual shortcut: post-LN)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="outlierfx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the main job on the packaged MiniLM (no arguments needed)")
    demo.add_argument("--batch", type=int, default=8, help="sentences in the example batch")
    demo.add_argument("--seq", type=int, default=128, help="max tokens per sentence")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except OutlierFXError as exc:
        print(f"outlierfx: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("outlierfx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
