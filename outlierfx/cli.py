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
    from .models import encode, load

    torch.manual_seed(0)
    print("outlierfx demo: capture the packaged all-MiniLM-L6-v2, map its structure, quantize it")
    loaded = load("minilm")
    print(f"  loaded {loaded.name} in {loaded.load_seconds:.1f}s")
    sentences = corpus.wikipedia("calibration")[: args.batch]
    inputs = encode(loaded, sentences, args.seq)
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

    from .api import quantize
    from .evaluate import EncoderEval

    print("\nquantizing (simulated W8A8) with the naive and best recipes; calibration on 64 Wikipedia paragraphs")
    texts = corpus.wikipedia("calibration")[:64]
    calibration = [encode(loaded, texts[i : i + 8], args.seq) for i in range(0, len(texts), 8)]
    evaluator = EncoderEval.build(loaded, sentences=64)
    reference = evaluator.embeddings(loaded.model)
    fp32 = evaluator.lee50(loaded.model)
    print(f"  FP32: Lee-50 correlation {fp32:.4f}")
    for recipe in ("naive", "best"):
        qmodel, qreport = quantize(loaded.model, calibration, recipe=recipe, bits="W8A8", progress=True)
        metrics = evaluator.metrics(qmodel, reference)
        print(f"  {recipe:5}: embedding cosine vs FP32 {metrics['cosine']:.4f}, Lee-50 {metrics['lee50']:.4f} "
              f"(calibration {qreport.calibration_seconds:.1f}s)")
    print("\naudit trail of the best recipe:")
    print("\n".join("  " + line for line in qreport.to_text().splitlines()[:12]))
    return 0


def _analyze(args: argparse.Namespace) -> int:
    import json
    import pathlib

    from . import corpus
    from .analysis import analyze_outliers, format_table, plot_heatmaps
    from .graph import capture
    from .models import encode, load
    from .passes import PassManager
    from .passes.migrate_gamma import MigrateGamma

    out = pathlib.Path(args.out or f"outlierfx-analyze-{pathlib.Path(args.model).name}")
    if out.exists() and any(out.iterdir()) and not args.force:
        raise OutlierFXError(f"output directory {out} exists and is not empty; choose another --out or pass --force")
    loaded = load(args.model)
    texts = corpus.wikipedia("calibration")[: args.samples]
    batches = [encode(loaded, texts[i : i + args.batch], args.seq) for i in range(0, len(texts), args.batch)]
    print(f"analyzing {loaded.name}: {len(texts)} Wikipedia calibration paragraphs, <= {args.seq} tokens each")
    gm = capture(loaded.model, batches[0])
    before = analyze_outliers(gm, batches, loaded.tokenizer, progress=True)
    pipeline = PassManager([MigrateGamma(channels=args.channels)])(gm)
    after = analyze_outliers(pipeline.graph_module, batches, loaded.tokenizer, progress=True)
    print(format_table(before, after))
    print()
    print(pipeline.audit.to_text())
    out.mkdir(parents=True, exist_ok=True)
    plot_heatmaps([("captured", before), (f"gamma migrated ({args.channels})", after)], str(out / "outliers.png"),
                  f"{loaded.name}: outlier channels before and after gamma migration")
    report = {
        "model": loaded.name,
        "samples": len(texts),
        "max_length": args.seq,
        "before": [t.as_dict() for t in before],
        "gamma_migration_channels": args.channels,
        "after_gamma_migration": [t.as_dict() for t in after],
        "audit": pipeline.audit.as_dict(),
    }
    (out / "outliers.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'outliers.png'} and {out / 'outliers.json'}")
    return 0


def _bench_accuracy(args: argparse.Namespace) -> int:
    from .benchmarks import accuracy, print_table, write_json
    from .passes.recipes import get_recipe
    from .quantizers.policy import parse_bits

    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    try:
        for r in recipes:
            get_recipe(r)
        for b in args.bits:
            parse_bits(b)
    except ValueError as exc:
        raise OutlierFXError(str(exc)) from exc
    result = accuracy(args.model, args.bits, recipes, policy=args.policy)
    print()
    print_table(result)
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="outlierfx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the main job on the packaged MiniLM (no arguments needed)")
    demo.add_argument("--batch", type=int, default=8, help="sentences in the example batch")
    demo.add_argument("--seq", type=int, default=128, help="max tokens per sentence")
    demo.set_defaults(func=_demo)
    analyze = sub.add_parser("analyze", help="outlier report (table, PNG heatmap, JSON) before/after gamma migration")
    analyze.add_argument("model", nargs="?", default=None, help="minilm, smollm2, or a local Hugging Face model folder")
    analyze.add_argument("--model", dest="model_opt", help=argparse.SUPPRESS)
    analyze.add_argument("--samples", type=int, default=64, help="calibration paragraphs (default 64)")
    analyze.add_argument("--batch", type=int, default=8, help="paragraphs per batch")
    analyze.add_argument("--seq", type=int, default=128, help="max tokens per paragraph")
    analyze.add_argument("--channels", choices=["all", "amplifying"], default="all",
                         help="gamma migration: every channel (the paper) or only |gamma| > 1")
    analyze.add_argument("--out", help="output directory (default ./outlierfx-analyze-MODEL)")
    analyze.add_argument("--force", action="store_true", help="write into a non-empty output directory")
    analyze.set_defaults(func=_analyze)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    acc = bench.add_parser("accuracy", help="quality of recipes x bit widths against FP32")
    acc.add_argument("--model", default="minilm", help="minilm, smollm2 or a local Hugging Face folder")
    acc.add_argument("--bits", nargs="+", default=["W8A8"], help="e.g. W8A8 W6A6 W4A8 (8 means W8A8)")
    acc.add_argument("--recipes", default="naive,mp16", help="comma-separated recipe names")
    acc.add_argument("--policy", default=None, help="override the recipe's policy: full, linear-inputs, mp16")
    acc.add_argument("--json", help="write machine-readable results here")
    acc.set_defaults(func=_bench_accuracy)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "analyze":
        args.model = args.model_opt or args.model
        if not args.model:
            parser.error("analyze needs a model: minilm, smollm2 or a local Hugging Face folder")
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
