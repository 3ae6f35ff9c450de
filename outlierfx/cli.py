"""The ``outlierfx`` command line."""

from __future__ import annotations

import argparse
import pathlib
import sys
import textwrap
import time
import warnings
from collections.abc import Sequence
from typing import Any

from .errors import OutlierFXError, SettingError


def _demo(args: argparse.Namespace) -> int:
    """Quantize the packaged MiniLM once with the default preset; at most ~25 lines of output."""
    import torch

    from . import corpus
    from .api import quantize
    from .backends import default_backend
    from .models import encode, load

    torch.manual_seed(0)
    backend = args.backend or default_backend()
    loaded = load("minilm")
    texts = corpus.wikipedia_sample("calibration", 64)
    calibration = [encode(loaded, texts[i : i + 8], args.seq) for i in range(0, len(texts), 8)]
    print(f"outlierfx demo: all-MiniLM-L6-v2 -> int8 on {backend}, {torch.get_num_threads()} threads; calibration: "
          f"64 Wikipedia paragraphs")
    start = time.perf_counter()
    int8, report = quantize(loaded.model, calibration, backend=backend, progress=not args.quiet)
    _print_quantized(report, time.perf_counter() - start)
    saved, report = _save_measure_and_report(pathlib.Path(args.out), loaded, int8, report, calibration,
                                             model_dir="model-int8", rounds=args.rounds, progress=not args.quiet)
    if args.verbose:
        print(report.to_text())
    return 0


def _print_quantized(report: Any, seconds: float) -> None:
    """The preset and why (wrapped), the report's notes, and how many Linears run on int8 kernels."""
    print(f"  {report.headline(why=False)}")
    if report.why:
        print(textwrap.fill(f"why: {report.why}", width=100, initial_indent="  ", subsequent_indent="    "))
    if report.backend_fit is not None and not report.backend_fit.whole_int8:
        print(textwrap.fill(report.backend_fit.summary(), width=100, initial_indent="  ", subsequent_indent="    "))
    for note in report.notes:  # e.g. a bfloat16 model quantized through a float32 copy
        print(textwrap.fill(f"note: {note}", width=100, initial_indent="  ", subsequent_indent="    "))
    lowered = [e.plan for e in report.audit if e.pass_name == "Lower"]
    done = f"  quantized in {seconds:.0f}s"
    if lowered:
        int8_linears = sum(1 for linear in lowered[-1].linears if linear.is_int8)
        done += f": {int8_linears}/{len(lowered[-1].linears)} Linears on int8 kernels"
    print(done)


def _save_measure_and_report(out: pathlib.Path, loaded: Any, int8: Any, report: Any, batches: list, *,
                             model_dir: str | None, rounds: int, progress: bool, measured: bool = True) -> tuple:
    """Save the int8 model (into ``out/model_dir``, or ``out`` itself), measure it against FP32,
    write the audit report; print where everything went. Returns (saved folder, measured report).
    ``batches``: inputs of the report's graphs (for a decoder with a KV cache, in the cache's form)."""
    from .measure import measure
    from .report import build_report
    from .serialize import TENSORS_FILE, save, size_on_disk_mb

    backend = report.backend
    saved = save(int8, out / model_dir if model_dir else out, tokenizer=loaded.tokenizer,
                 info={"model": loaded.name, "recipe": report.recipe, "bits": report.bits}, overwrite=True)
    if measured:
        if backend == "inductor":
            print("  compiling the int8 model with inductor (first call; minutes on 2 cores)")
        label = f"int8 ({backend})"
        measurement = measure(loaded, int8, label, rounds=rounds, size_mb=size_on_disk_mb(saved / TENSORS_FILE))
        print("\n".join("  " + line for line in measurement.lines(label)))
        report = report.with_measurements(quality=measurement.quality, latency=measurement.latency)
    html, _ = build_report(out, report=report, batches=batches[:4], tokenizer=loaded.tokenizer,
                           model_name=loaded.name, progress=progress, overwrite=True)
    print(f"  model: {saved}\n  audit report: {html} (every pass, its plan and its numeric check)")
    return saved, report


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


def _recipe_name(args: argparse.Namespace) -> str | None:
    """The --recipe argument (None: the preset ``fast``) with ``--fine``'s suffix, validated early."""
    from .recipes import FINE_SUFFIX, PRESETS, get_recipe

    recipe = args.recipe
    if args.fine:
        if recipe is None or recipe in PRESETS:
            raise OutlierFXError("--fine adds the fine stage to a named recipe (e.g. --recipe os --fine); "
                                 "the presets are complete recipes")
        recipe += FINE_SUFFIX
    if recipe is not None:
        get_recipe(recipe, args.backend)  # a RecipeError (an OutlierFXError) before any model is loaded
    return recipe


def _bench_accuracy(args: argparse.Namespace) -> int:
    from .benchmarks import accuracy, show_and_write
    from .recipes import FINE_SUFFIX, get_recipe

    recipes = [r.strip() + (FINE_SUFFIX if args.fine else "") for r in args.recipes.split(",") if r.strip()]
    for r in recipes:
        get_recipe(r)  # a RecipeError (an OutlierFXError) before any model is loaded
    show_and_write(accuracy(args.model, args.bits, recipes, policy=args.policy, backend=args.backend), args.json)
    return 0


def _quantize(args: argparse.Namespace) -> int:
    """Quantize and save; under ``torchrun`` every rank calibrates its share of the batches and
    rank 0 alone prints and writes (docs/distributed.md)."""
    from . import distributed

    created = distributed.init_from_environment()
    try:
        return _quantize_on_this_rank(args)
    finally:
        if created:
            distributed.shutdown()


def _quantize_on_this_rank(args: argparse.Namespace) -> int:
    import json

    from . import corpus, distributed
    from .api import quantize
    from .backends import check_backend, default_backend
    from .generation import QuantizedCausalLM
    from .graph.kv_cache import prefill_batches
    from .models import load, load_without_weights, saved_folder

    main = distributed.is_main()
    out = pathlib.Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise OutlierFXError(f"output directory {out} exists and is not empty; choose another --out or pass --force")
    backend = check_backend(args.backend or default_backend())
    recipe = _recipe_name(args)
    # --low-memory: the model on the meta device (its config and forward's inputs) and its tokenizer
    loaded = load_without_weights(args.model) if args.low_memory else load(args.model)
    if args.calibration:
        texts, source = corpus.evenly_spaced(corpus.from_text_file(args.calibration), args.samples), args.calibration
    else:
        texts, source = corpus.wikipedia_sample("calibration", args.samples), "the packaged Wikipedia calibration split"
    batches = corpus.calibration_batches(loaded, texts, max_length=args.seq, batch_size=args.batch,
                                         source=source)
    if main:
        split = f", shared by {distributed.world_size()} processes" if distributed.active() else ""
        print(f"quantizing {loaded.name} ({recipe or 'preset fast'}, {args.bits}, backend {backend}) on {len(batches)} "
              f"batches from {source}{split}")
    start = time.perf_counter()
    model, report = quantize(saved_folder(args.model) if args.low_memory else loaded.model, batches, recipe=recipe,
                             bits=args.bits, policy=args.policy, backend=backend, progress=True,
                             low_memory=args.low_memory)
    if isinstance(model, QuantizedCausalLM):  # saved with its KV cache: `outlierfx generate` continues prompts with it
        batches = prefill_batches(loaded.model.config, batches)  # the report graphs' inputs
    if not main:  # every rank holds the same model; rank 0 writes it
        return 0
    _print_quantized(report, time.perf_counter() - start)
    if args.low_memory and not args.no_measure:
        print(textwrap.fill(
            f"not measured against FP32: that loads the FP32 model, which --low-memory never does; measure the saved "
            f"model separately where the FP32 model fits (outlierfx.load({str(out)!r}) next to the FP32 model)",
            width=100, initial_indent="  ", subsequent_indent="    "))
    _, report = _save_measure_and_report(out, loaded, model, report, batches, model_dir=None, rounds=args.rounds,
                                         progress=True, measured=not (args.no_measure or args.low_memory))
    (out / "quantization.json").write_text(json.dumps(report.as_dict(), indent=1, default=str))
    if args.verbose:
        print(report.to_text())
    return 0


def _generate(args: argparse.Namespace) -> int:
    """Continue ``--prompt`` with a decoder saved by ``outlierfx quantize``, printing the text as it
    comes and then the speed of the prompt (prefill) and of the new tokens (decode)."""
    import torch

    from .generation import QuantizedCausalLM
    from .serialize import load

    model = load(args.directory, backend=args.backend)
    if not isinstance(model, QuantizedCausalLM):
        raise OutlierFXError(f"{args.directory} holds a model without a KV cache, which cannot generate; quantize a "
                             f"decoder with `outlierfx quantize smollm2 --out DIR` and generate from DIR")
    if model.tokenizer is None:
        raise OutlierFXError(f"{args.directory} has no tokenizer files; save the model with its tokenizer "
                             f"(outlierfx.save(model, DIR, tokenizer=tokenizer))")
    torch.manual_seed(args.seed)
    prompt = model.tokenizer(args.prompt, return_tensors="pt").input_ids
    streamer = _TimedStreamer(model.tokenizer)
    model.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, streamer=streamer)
    print(streamer.summary(prompt.shape[1]))
    return 0


class _TimedStreamer:
    """Prints the text as tokens arrive (transformers' ``TextStreamer``) and times them: the first
    new token comes after the prompt's prefill, each later one after one decode step."""

    def __init__(self, tokenizer: Any) -> None:
        from transformers import TextStreamer

        self.text = TextStreamer(tokenizer)
        self.times: list[float] = []

    def put(self, value: Any) -> None:  # first the prompt (generation starts), then each new token
        self.times.append(time.perf_counter())
        self.text.put(value)

    def end(self) -> None:
        self.text.end()

    def summary(self, prompt_tokens: int) -> str:
        new = len(self.times) - 1
        if new < 1:
            return "no new tokens"
        prefill = self.times[1] - self.times[0]
        line = f"prompt: {prompt_tokens} tokens in {prefill * 1000:.0f} ms"
        if new > 1:
            decode = self.times[-1] - self.times[1]
            line += f"; {new - 1} more tokens at {(new - 1) / decode:.1f} tokens/s ({decode / (new - 1) * 1000:.1f} ms each)"
        return line


def _bench_speed(args: argparse.Namespace) -> int:
    from .backends import check_backend
    from .benchmarks import write_json
    from .speed import speed

    backends = [check_backend(b.strip()) for b in args.backends.split(",") if b.strip()]
    result = speed(args.model, recipe=args.recipe, bits=args.bits, backends=backends, policy=args.policy,
                   threads=args.threads, rounds=args.rounds, peers=not args.no_peers, onnx=args.onnx,
                   decode=not args.no_decode)
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_onnx

    out = pathlib.Path(args.out)
    if out.exists() and not args.force:
        raise OutlierFXError(f"{out} exists; choose another --out or pass --force")
    if not pathlib.Path(args.model).is_dir():
        raise OutlierFXError(f"{args.model} is not a folder; export a model saved by outlierfx quantize --out "
                             f"or outlierfx.save")
    start = time.perf_counter()
    path = export_onnx(args.model, out)
    print(f"wrote {path} (QDQ ONNX, {path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="outlierfx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the main job on the packaged MiniLM (no arguments needed)")
    demo.add_argument("--seq", type=int, default=128, help="max tokens per sentence")
    demo.add_argument("--rounds", type=int, default=10, help="timed runs per model")
    demo.add_argument("--out", default="outlierfx-demo", help="where the int8 model and the report go")
    demo.add_argument("--backend", default=None, help="default: this CPU's best (onednn on x86 with VNNI/AMX)")
    demo.add_argument("--verbose", action="store_true", help="print every pass's plan")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    quant = sub.add_parser("quantize", help="quantize a model to int8 and save it with its audit report")
    quant.add_argument("model", help="minilm, smollm2, or a local Hugging Face model folder")
    quant.add_argument("--recipe", default=None,
                       help="a preset, fast (default) or accurate, or a paper recipe: naive, os, peg, smooth-peg...")
    quant.add_argument("--bits", default="W8A8", help="e.g. W8A8 (default), W6A6, W4A8")
    quant.add_argument("--backend", default=None,
                       help="onednn (default on x86 CPUs with VNNI/AMX), x86, fbgemm, qnnpack, inductor, reference")
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
    quant.add_argument("--verbose", action="store_true", help="print every pass's plan")
    quant.add_argument("--no-measure", action="store_true",
                       help="skip the quality and latency measurement against FP32 (held-out text)")
    quant.add_argument("--rounds", type=int, default=10, help="timed runs per model for the latency measurement")
    quant.add_argument("--low-memory", action="store_true",
                       help="never load the model: read one block's weights at a time from its safetensors files "
                            "(needs a recipe of observers and calibration only, e.g. naive; skips the FP32 "
                            "measurement, which would load the model)")
    quant.set_defaults(func=_quantize)
    export = sub.add_parser("export", help="write a saved int8 model as a QDQ ONNX model for ONNX Runtime")
    export.add_argument("model", help="a folder written by outlierfx quantize --out or outlierfx.save")
    export.add_argument("--format", choices=["onnx"], default="onnx", help="onnx (QDQ: QuantizeLinear/DequantizeLinear)")
    export.add_argument("--out", required=True, help="the ONNX file to write")
    export.add_argument("--force", action="store_true", help="replace an existing --out file")
    export.set_defaults(func=_export)
    gen = sub.add_parser("generate", help="continue a prompt with a decoder saved by `outlierfx quantize`")
    gen.add_argument("directory", help="a folder written by `outlierfx quantize` for a decoder (e.g. smollm2)")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="at most this many new tokens (default 64)")
    gen.add_argument("--sample", action="store_true", help="sample (default: greedy, the most likely token)")
    gen.add_argument("--temperature", type=float, default=1.0, help="with --sample: divides the logits")
    gen.add_argument("--top-k", type=int, default=None, help="with --sample: only the k most likely tokens")
    gen.add_argument("--top-p", type=float, default=None, help="with --sample: the smallest set with this mass")
    gen.add_argument("--seed", type=int, default=0, help="with --sample: the random seed")
    gen.add_argument("--backend", default=None, help="default: the backend the model was saved with")
    gen.set_defaults(func=_generate)
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
    acc.add_argument("--backend", default=None,
                     help="lower each model to this backend and score what runs (default: simulated, fake-quant)")
    acc.add_argument("--json", help="write machine-readable results here")
    acc.set_defaults(func=_bench_accuracy)
    spd = bench.add_parser("speed", help="latency, quality and size of FP32 and each int8 path (and peers)")
    spd.add_argument("--model", default="minilm", help="minilm (batch 8 x 128) or smollm2 (1 x 256 prefill)")
    spd.add_argument("--recipe", default=None, help="default: each backend's fast preset")
    spd.add_argument("--bits", default="W8A8")
    spd.add_argument("--backends", default="onednn,inductor",
                     help="comma-separated int8 paths of ours (also x86, fbgemm, qnnpack, reference)")
    spd.add_argument("--policy", default=None, help="override the recipe's policy: full, linear-inputs, mp16")
    spd.add_argument("--threads", type=int, default=2)
    spd.add_argument("--rounds", type=int, default=10, help="interleaved timed rounds (median reported)")
    spd.add_argument("--no-peers", action="store_true", help="skip torch.ao dynamic and torchao PT2E")
    spd.add_argument("--no-decode", action="store_true",
                     help="skip the decode rows of a causal LM (one token at batch 1 after 256 in the cache)")
    spd.add_argument("--onnx", action="store_true",
                     help="also FP32 and the first backend's int8 model exported to ONNX, in ONNX Runtime")
    spd.add_argument("--json", help="write machine-readable results here")
    spd.set_defaults(func=_bench_speed)
    return parser


_POSITIVE_COUNTS = ("samples", "batch", "seq", "rounds", "threads", "max_new_tokens")


def _check_settings(args: argparse.Namespace) -> None:
    """Refuse bad sizes, bit widths and policy names (a SettingError: one line, exit 2) before
    any model is loaded."""
    from .quantizers.policy import make_policy, parse_bits

    for name in _POSITIVE_COUNTS:
        value = getattr(args, name, None)
        if isinstance(value, int) and value < 1:
            raise SettingError(f"--{name} must be a positive integer, got {value}")
    bits = getattr(args, "bits", None)
    for widths in bits if isinstance(bits, list) else [bits] if bits is not None else []:
        parse_bits(widths)
    if getattr(args, "policy", None) is not None:
        make_policy(args.policy)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The command line owns its process: torch's notice that quantized tensors are deprecated (the
    # eager int8 engines use them) is not something its user can act on. The library leaves the
    # filters alone.
    warnings.filterwarnings("ignore", message=r".*quantized tensor.*deprecated.*", category=UserWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\._inductor\..*")  # compiler internals
    if args.command == "analyze":
        args.model = args.model_opt or args.model
        if not args.model:
            parser.error("analyze needs a model: minilm, smollm2 or a local Hugging Face folder")
    try:
        _check_settings(args)
        return int(args.func(args))
    except OutlierFXError as exc:
        print(f"outlierfx: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("outlierfx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
