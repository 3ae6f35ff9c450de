"""Peak resident memory of capture + calibration + ConvertToFakeQuant + Lower, with the weights
loaded (the normal run) and without them (capture on meta, calibration in block order, each
block's weights loaded from the safetensors file only while its nodes run, conversion block by
block into int8 codes, lowering from those codes): issue 28's ``--low-memory`` path so far.

    .venv/bin/python bench/scripts/low_memory_calibration.py [--samples 64] [--policy full] [--recipe rotate+sink]

Each mode runs in its own process (``--mode full`` / ``--mode low``), so each process's
``ru_maxrss`` is that mode's peak; both calibrate the same SmolLM2 batches (the CLI's 64
paragraphs in batches of 8 x 128 tokens) on InsertObservers' observers, and convert with the
policy's weight and embedding specs, and lower with FuseAttention + Lower (the pass objects,
without the pass manager's output checks, whose forward would add the logits) to onednn where
it runs, reference elsewhere. ``--recipe`` runs a recipe's prepare passes (the pass objects,
e.g. ``rotate+sink``'s gamma migration and rotations) before InsertObservers, which then takes
the recipe's policy (``--policy`` is ignored). RSS does not depend on the machine's load; the
times do.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def run_mode(mode: str, samples: int, policy: str, recipe_name: str | None) -> None:
    import torch

    from outlierfx import capture, corpus
    from outlierfx.graph.weight_source import capture_without_weights
    from outlierfx.models import load_smollm2, load_without_weights, smollm2_folder
    from outlierfx.graph import meta
    from outlierfx.backends import runnable_backends
    from outlierfx.passes import ConvertToFakeQuant, FuseAttention, InsertObservers, Lower
    from outlierfx.quantizers.integer_codes import HeldCodes
    from outlierfx.quantizers.calibrate import calibrate
    from outlierfx.quantizers.policy import make_policy, parse_bits
    from outlierfx.recipes.base import RunContext, Stage
    from outlierfx.recipes.papers import paper_recipe

    start = time.perf_counter()

    def mark(what: str) -> None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{mode:4s} {time.perf_counter() - start:7.1f}s  rss {rss_mb():6.0f} MB  peak {peak:6.0f} MB  {what}",
              flush=True)

    mark("imported")
    texts = corpus.wikipedia_sample("calibration", samples)
    if mode == "full":
        loaded = load_smollm2()
        batches = corpus.calibration_batches(loaded, texts)
        mark("model loaded, batches tokenized")
        gm = capture(loaded.model, batches[0])
    else:
        folder = smollm2_folder()  # dequantizes the packaged GGUF into the cache, once
        # the meta-device model only gives encode() the names its forward takes
        batches = corpus.calibration_batches(load_without_weights("smollm2"), texts)
        mark("batches tokenized")
        gm = capture_without_weights(folder, batches[0])
    mark("captured")
    quant_policy = make_policy(policy)
    if recipe_name is not None:
        recipe = paper_recipe(recipe_name)
        if recipe.observe or recipe.finish:
            raise SystemExit(f"{recipe_name}: only recipes with prepare passes alone are measured here")
        quant_policy = recipe.policy(parse_bits("W8A8"))
        for rewrite in recipe.build(Stage.PREPARE, RunContext(batches, quant_policy)):
            rewriting = time.perf_counter()
            gm = rewrite(gm).graph_module
            mark(f"{rewrite.name} ({time.perf_counter() - rewriting:.1f}s)")
    gm = InsertObservers(quant_policy)(gm).graph_module
    mark("observers inserted")
    seconds = calibrate(gm, batches, progress=False)
    mark(f"calibrated ({seconds:.1f}s)")
    converting = time.perf_counter()
    gm = ConvertToFakeQuant(quant_policy.weight, quant_policy.embedding)(gm).graph_module
    mark(f"converted ({time.perf_counter() - converting:.1f}s)")
    source = gm.meta.get(meta.GM_WEIGHT_SOURCE)
    if source is not None:
        held = {id(e): e for e in source.tensors.values() if isinstance(e, HeldCodes)}.values()
        codes_mb = sum(t.numel() * t.element_size() for e in held for t in (e.codes, e.scale)) / 2**20
        print(f"{mode:4s} {len(held)} quantized weights held as int8 codes: {codes_mb:.0f} MB", flush=True)
    backend = runnable_backends(("onednn", "reference"))[0]
    lowering = time.perf_counter()
    lowered = Lower(backend)(FuseAttention()(gm).graph_module).graph_module
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mark(f"lowered to {backend} ({time.perf_counter() - lowering:.1f}s; peak so far {peak:.0f} MB)")
    with torch.no_grad():
        lowered(**batches[0])
    mark("the int8 model ran one batch")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{mode:4s} peak RSS (ru_maxrss) {peak:.0f} MB, total {time.perf_counter() - start:.1f}s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("full", "low", "both"), default="both")
    parser.add_argument("--samples", type=int, default=64, help="calibration paragraphs (the CLI's default)")
    parser.add_argument("--policy", default="full", help="InsertObservers policy")
    parser.add_argument("--recipe", default=None, help="a recipe whose prepare passes run first (rotate+sink)")
    args = parser.parse_args()
    if args.mode != "both":
        run_mode(args.mode, args.samples, args.policy, args.recipe)
        return
    recipe = ["--recipe", args.recipe] if args.recipe else []
    for mode in ("full", "low"):  # one process each: ru_maxrss is a process's peak
        subprocess.run([sys.executable, __file__, "--mode", mode, "--samples", str(args.samples),
                        "--policy", args.policy, *recipe], check=True)


if __name__ == "__main__":
    main()
