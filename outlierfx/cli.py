"""The ``outlierfx`` command line."""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from collections.abc import Sequence

from .errors import OutlierFXError


def _demo(args: argparse.Namespace) -> int:
    import torch

    from . import corpus
    from .api import lower, quantize
    from .evaluate import EncoderEval
    from .graph import capture, meta
    from .graph.view import GraphView
    from .models import encode, load
    from .backends.registry import default_backend
    from .report import build_report
    from .serialize import save_quantized, size_on_disk_mb
    from .speed import interleaved_medians, speed_inputs, state_size_mb

    torch.manual_seed(0)
    out = pathlib.Path(args.out)
    backend = default_backend()
    print(f"outlierfx demo: all-MiniLM-L6-v2 -> int8 ({backend}) with the 'best' recipe, W8A8; "
          f"{torch.get_num_threads()} threads")
    loaded = load("minilm")
    print(f"  loaded {loaded.name} in {loaded.load_seconds:.1f}s")
    texts = corpus.wikipedia_sample("calibration", 64)
    calibration = [encode(loaded, texts[i : i + 8], args.seq) for i in range(0, len(texts), 8)]
    start = time.perf_counter()
    gm = capture(loaded.model, calibration[0])
    report = gm.meta[meta.GM_CAPTURE_REPORT]
    view = GraphView(gm)
    print(f"  captured in {time.perf_counter() - start:.1f}s: {report.num_nodes} nodes, {len(view.blocks)} blocks, "
          f"{len(view.residual_adds)} residual adds, {len(view.norm_sites)} norms; max |error| vs the model "
          f"{report.error.max_abs:.1e}")

    print("\n1. quantize: capture, passes, calibration on 64 Wikipedia paragraphs (one per article)")
    start = time.perf_counter()
    fake, qreport = quantize(loaded.model, calibration, recipe="best", bits="W8A8", progress=True)
    int8, qreport = lower(fake, qreport, backend)
    print(f"  done in {time.perf_counter() - start:.1f}s")
    print("\n".join("  " + line for line in qreport.audit.to_text().splitlines() if line.strip()))
    # 'best' lowers every Linear to 24 int8 sub-GEMMs (its PEG groups), slower than FP32 on the
    # eager engines: the speed route quantizes the Linear inputs only, per tensor (one int8 GEMM per
    # Linear), with Quadapter scales where they fold; on onednn the first token gets its own grid
    # too (its rows cost one small GEMM more per Linear; the torch.ao engines would need two GEMMs)
    fast_recipe = "smooth-fold+sink" if backend == "onednn" else "smooth"
    fast_name = f"int8 fast ({backend})"
    start = time.perf_counter()
    fast, _ = quantize(loaded.model, calibration, recipe=fast_recipe, bits="W8A8", backend=backend, progress=True)
    print(f"  speed route for comparison: recipe '{fast_recipe}', policy 'linear-inputs' -> {fast_name} "
          f"({time.perf_counter() - start:.1f}s)")

    print("\n2. quality on 64 held-out Wikipedia paragraphs and the Lee-50 similarity benchmark")
    evaluator = EncoderEval.build(loaded, sentences=64)
    reference = evaluator.embeddings(loaded.model)
    quality = {"FP32": evaluator.metrics(loaded.model, reference),
               "fake-quant W8A8": evaluator.metrics(fake, reference),
               f"int8 ({backend})": evaluator.metrics(int8, reference),
               fast_name: evaluator.metrics(fast, reference)}
    for name, m in quality.items():
        print(f"  {name:18} embedding cosine vs FP32 {m['cosine']:.4f}   Lee-50 correlation {m['lee50']:.4f}")

    print(f"\n3. latency: batch 8 x {args.seq} tokens, median of {args.rounds} interleaved runs")
    inputs = speed_inputs(loaded, 8, args.seq)
    seconds = interleaved_medians({"FP32": loaded.model, f"int8 ({backend})": int8, fast_name: fast}, inputs,
                                  args.rounds)
    median = {name: s * 1000 for name, s in seconds.items()}
    fp32_ms = median["FP32"]
    for name, ms in median.items():
        print(f"  {name:18} {ms:8.1f} ms   x{ms / fp32_ms:.2f} of FP32")

    print("\n4. size on disk and the audit report")
    saved = save_quantized(int8, out / "model-int8", {"recipe": "best", "bits": "W8A8", "backend": backend},
                           overwrite=True)
    fp32_mb = state_size_mb(loaded.model)
    int8_mb = size_on_disk_mb(saved)
    print(f"  FP32 {fp32_mb:.1f} MB -> int8 {int8_mb:.1f} MB (x{int8_mb / fp32_mb:.2f}); saved to {saved}")
    speed = {name: {"latency_ms": round(ms, 2), "ratio_vs_fp32": round(ms / fp32_ms, 3)} for name, ms in median.items()}
    speed["FP32"]["size_mb"], speed[f"int8 ({backend})"]["size_mb"] = round(fp32_mb, 1), round(int8_mb, 1)
    speed[fast_name]["size_mb"] = round(state_size_mb(fast), 1)
    # quantization errors on held-out text: calibrated ranges clip nothing on their own data
    html, js = build_report(out, model=loaded.model, qmodel=fake, report=qreport, batches=calibration[:4],
                            error_batches=evaluator.batches[:4], tokenizer=loaded.tokenizer, quality=quality,
                            speed=speed, model_name=loaded.name, progress=True, overwrite=True)
    print(f"  audit report: {html} (and {js.name})")
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
    texts = corpus.wikipedia_sample("calibration", args.samples)
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
    from .passes.recipes import FINE_SUFFIX, get_recipe
    from .quantizers.policy import parse_bits

    recipes = [r.strip() + (FINE_SUFFIX if args.fine else "") for r in args.recipes.split(",") if r.strip()]
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


def _quantize(args: argparse.Namespace) -> int:
    import json

    from . import corpus
    from .api import lower, quantize
    from .models import load
    from .passes.recipes import FINE_SUFFIX, get_recipe
    from .backends.registry import check_backend, default_backend
    from .report import build_report
    from .serialize import save_quantized

    out = pathlib.Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise OutlierFXError(f"output directory {out} exists and is not empty; choose another --out or pass --force")
    backend = check_backend(args.backend or default_backend())
    recipe = args.recipe + (FINE_SUFFIX if args.fine else "")
    try:
        get_recipe(recipe)
    except ValueError as exc:
        raise OutlierFXError(str(exc)) from exc
    loaded = load(args.model)
    if args.calibration:
        texts, source = corpus.evenly_spaced(corpus.from_text_file(args.calibration), args.samples), args.calibration
    else:
        texts, source = corpus.wikipedia_sample("calibration", args.samples), "the packaged Wikipedia calibration split"
    batches = corpus.calibration_batches(loaded, texts, max_length=args.seq, batch_size=args.batch,
                                         source=source)
    print(f"quantizing {loaded.name} ({recipe}, {args.bits}, backend {backend}) on {len(batches)} batches "
          f"from {source}")
    fake, report = quantize(loaded.model, batches, recipe=recipe, bits=args.bits, policy=args.policy, progress=True)
    model, report = lower(fake, report, backend)
    saved = save_quantized(model.reference if backend == "inductor" else model, out,
                           {"model": loaded.name, "recipe": recipe, "bits": args.bits, "backend": backend},
                           overwrite=args.force)
    (out / "quantization.json").write_text(json.dumps(report.as_dict(), indent=1, default=str))
    html, _ = build_report(out, model=loaded.model, qmodel=fake, report=report, batches=batches[:4],
                           tokenizer=loaded.tokenizer, model_name=loaded.name, progress=True, overwrite=args.force)
    print(report.to_text())
    print(f"wrote {saved}, {html} and {out / 'quantization.json'}")
    return 0


def _bench_speed(args: argparse.Namespace) -> int:
    from .benchmarks import write_json
    from .backends.registry import check_backend
    from .speed import speed

    backends = [check_backend(b.strip()) for b in args.backends.split(",") if b.strip()]
    result = speed(args.model, recipe=args.recipe, bits=args.bits, backends=backends, policy=args.policy,
                   threads=args.threads, rounds=args.rounds, peers=not args.no_peers)
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="outlierfx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the main job on the packaged MiniLM (no arguments needed)")
    demo.add_argument("--seq", type=int, default=128, help="max tokens per sentence")
    demo.add_argument("--rounds", type=int, default=10, help="timed runs per model")
    demo.add_argument("--out", default="outlierfx-demo", help="where the int8 model and the report go")
    demo.set_defaults(func=_demo)
    quant = sub.add_parser("quantize", help="quantize a model to int8 and save it with its audit report")
    quant.add_argument("model", help="minilm, smollm2, or a local Hugging Face model folder")
    quant.add_argument("--recipe", default="best", help="naive, mp16, os, peg, os+peg, best, ... (default best)")
    quant.add_argument("--bits", default="W8A8", help="e.g. W8A8 (default), W6A6, W4A8")
    quant.add_argument("--backend", default=None, help="onednn (default on x86 CPUs with VNNI/AMX), x86, fbgemm, qnnpack, inductor, reference")
    quant.add_argument("--policy", default=None, help="override the recipe's policy: full, linear-inputs, mp16")
    quant.add_argument("--fine", action="store_true",
                       help="add the fine stage: learn every activation range against the output (recipe+lsq)")
    quant.add_argument("--calibration", help="a text file (paragraphs separated by blank lines); default: Wikipedia")
    quant.add_argument("--samples", type=int, default=64,
                       help="calibration paragraphs (default 64), spread over the articles or the file")
    quant.add_argument("--batch", type=int, default=8, help="paragraphs per calibration batch")
    quant.add_argument("--seq", type=int, default=128, help="max tokens per paragraph")
    quant.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    quant.add_argument("--force", action="store_true", help="write into a non-empty output directory")
    quant.set_defaults(func=_quantize)
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
    acc.add_argument("--fine", action="store_true", help="run every recipe with the fine stage (recipe+lsq)")
    acc.add_argument("--json", help="write machine-readable results here")
    acc.set_defaults(func=_bench_accuracy)
    spd = bench.add_parser("speed", help="latency, quality and size of FP32 and each int8 path (and peers)")
    spd.add_argument("--model", default="minilm", help="minilm (batch 8 x 128) or smollm2 (1 x 256 prefill)")
    spd.add_argument("--recipe", default="best")
    spd.add_argument("--bits", default="W8A8")
    spd.add_argument("--backends", default="onednn,x86,inductor", help="comma-separated int8 paths of ours")
    spd.add_argument("--policy", default=None, help="override the recipe's policy: full, linear-inputs, mp16")
    spd.add_argument("--threads", type=int, default=2)
    spd.add_argument("--rounds", type=int, default=10, help="interleaved timed rounds (median reported)")
    spd.add_argument("--no-peers", action="store_true", help="skip torch.ao dynamic and torchao PT2E")
    spd.add_argument("--json", help="write machine-readable results here")
    spd.set_defaults(func=_bench_speed)
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
