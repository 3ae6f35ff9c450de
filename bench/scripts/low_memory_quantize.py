"""Issue 28's acceptance run for ``--low-memory``: the same ``quantize()`` call with the model
loaded (``full``) and without it (``low``: ``quantize(folder, ..., low_memory=True)``), each in
its own process, so each process's ``ru_maxrss`` is that mode's peak.

    .venv/bin/python bench/scripts/low_memory_quantize.py [--model smollm2] [--recipe REC] [--backend onednn]

Both calibrate on the CLI's defaults (64 Wikipedia calibration paragraphs in batches of 8 x 128
tokens) with the default preset (``--recipe`` to pick another) and lower to ``--backend``; each
prints the peak RSS and the wall time of the quantize call (the full run's includes loading the
model, which the low-memory run never does) and the lowered model's wiki perplexity on the
benchmarks' evaluation slice (``evaluate.DecoderEval``: 24 windows of 256 tokens of the
Wikipedia evaluation split; only the tokenizer is loaded for it). The JSON (both modes and the
low/full ratios) goes to ``--json``, by default bench/results/MODEL/low-memory.json for a
packaged model. RSS does not depend on the machine's load; the times do.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import time

RESULT = "RESULT "  # the line a mode's process prints its figures on


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_mode(mode: str, model: str, recipe: str | None, backend: str) -> dict:
    from outlierfx import corpus, quantize
    from outlierfx.evaluate import DecoderEval
    from outlierfx.models import load, load_without_weights, saved_folder

    saved_folder(model)  # a packaged model's folder exists before the timing (SmolLM2's is built once)
    start = time.perf_counter()
    loaded = load(model) if mode == "full" else load_without_weights(model)
    texts = corpus.wikipedia_sample("calibration", 64)
    batches = corpus.calibration_batches(loaded, texts, max_length=128, batch_size=8)
    int8, report = quantize(loaded.model if mode == "full" else saved_folder(model), batches, recipe=recipe,
                            backend=backend, progress=False, low_memory=mode == "low")
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    print(f"{mode:4s} {report.headline(why=False)}: {seconds:.1f}s, peak RSS {peak:.0f} MB", flush=True)
    ppl = DecoderEval.perplexity(int8, DecoderEval.build(loaded).wiki)
    print(f"{mode:4s} wiki perplexity {ppl:.3f}", flush=True)
    return {"recipe": report.recipe, "backend": report.backend, "quantize_seconds": round(seconds, 1),
            "peak_rss_mb": round(peak), "ppl_wiki": round(ppl, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("full", "low", "both"), default="both")
    parser.add_argument("--model", default="smollm2", help="a packaged decoder (smollm2) or a local folder")
    parser.add_argument("--recipe", default=None, help="default: the default preset")
    parser.add_argument("--backend", default="onednn")
    parser.add_argument("--json", default=None, help="default: bench/results/MODEL/low-memory.json (packaged model)")
    args = parser.parse_args()
    if args.mode != "both":
        print(RESULT + json.dumps(run_mode(args.mode, args.model, args.recipe, args.backend)), flush=True)
        return
    results = {}
    for mode in ("full", "low"):  # one process each: ru_maxrss is a process's peak
        command = [sys.executable, __file__, "--mode", mode, "--model", args.model, "--backend", args.backend,
                   *(["--recipe", args.recipe] if args.recipe else [])]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        lines = done.stdout.splitlines()
        print("\n".join(line for line in lines if not line.startswith(RESULT)), flush=True)
        results[mode] = json.loads(next(line for line in lines if line.startswith(RESULT))[len(RESULT):])
    full, low = results["full"], results["low"]
    ratios = {"peak_rss": round(low["peak_rss_mb"] / full["peak_rss_mb"], 3),
              "quantize_seconds": round(low["quantize_seconds"] / full["quantize_seconds"], 3),
              "ppl_wiki": round(low["ppl_wiki"] / full["ppl_wiki"], 5)}
    print(f"low / full: peak RSS {ratios['peak_rss']:.0%}, time {ratios['quantize_seconds']:.2f}x, "
          f"perplexity {low['ppl_wiki']:.3f} vs {full['ppl_wiki']:.3f}")
    from outlierfx.models import PACKAGED_MODELS

    out = args.json or (f"bench/results/{args.model}/low-memory.json" if args.model in PACKAGED_MODELS else None)
    if out:
        result = {"model": args.model, "calibration": "64 Wikipedia paragraphs, batches of 8 x 128 tokens",
                  "full": full, "low": low, "low_over_full": ratios}
        pathlib.Path(out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
