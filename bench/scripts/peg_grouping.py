"""PEG grouping variants on every channel-axis activation: equal groups (the paper), range-sized
groups (``grouping="range"``), one range per channel, each optionally with the fine stage.

    .venv/bin/python bench/scripts/peg_grouping.py --model minilm \
        --variants equal:24,equal:48,channel,range:24,range:48 \
        --json bench/results/minilm/peg-grouping.json
    .venv/bin/python bench/scripts/peg_grouping.py --model smollm2 --windows 8 \
        --variants equal:48,channel,range:24,range:48,range:96 \
        --json bench/results/smollm2/peg-grouping.json
    .venv/bin/python bench/scripts/peg_grouping.py --model minilm --variants range:24+lsq,channel+lsq

Calibration as ``outlierfx bench accuracy``; weights per-channel min-max (the variants differ
only in the activation groups); MiniLM: embedding cosine / Lee-50 on 128 held-out paragraphs,
SmolLM2: Wikipedia perplexity on ``--windows`` x 256 held-out tokens.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from outlierfx.api import quantize
from outlierfx.benchmarks import load_with_calibration
from outlierfx.evaluate import DecoderEval, EncoderEval
from outlierfx.passes.group_channels import CHANNEL_ROLES, GroupChannels
from outlierfx.recipes import FINE_SUFFIX, Recipe, step, with_fine_stage


def variant_recipe(variant: str) -> Recipe:
    """``equal:K``, ``range:K`` or ``channel``, with an optional ``+lsq``."""
    base = variant.removesuffix(FINE_SUFFIX)
    grouping, _, k = base.partition(":")
    if grouping == "channel":
        peg = step(GroupChannels, groups=None, roles=CHANNEL_ROLES)
    elif grouping in ("equal", "range") and k.isdigit():
        peg = step(GroupChannels, groups=int(k), roles=CHANNEL_ROLES, grouping=grouping)
    else:
        raise SystemExit(f"unknown variant {variant!r}: use equal:K, range:K or channel, optionally +lsq")
    recipe = Recipe(variant, f"PEG {base} on every channel-axis activation", observe=(peg,))
    return with_fine_stage(recipe, name=variant) if variant.endswith(FINE_SUFFIX) else recipe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--bits", default="W8A8")
    parser.add_argument("--variants", default="equal:24,range:24,channel")
    parser.add_argument("--windows", type=int, default=24, help="SmolLM2 evaluation windows of 256 tokens")
    parser.add_argument("--json")
    args = parser.parse_args()
    loaded, batches = load_with_calibration(args.model)
    model = loaded.model.eval()
    if loaded.kind == "encoder":
        evaluator = EncoderEval.build(loaded)
        reference = evaluator.embeddings(model)
        metrics = lambda m: evaluator.metrics(m, reference)
    else:
        decoder = DecoderEval.build(loaded, windows=args.windows)
        metrics = lambda m: {"ppl_wiki": DecoderEval.perplexity(m, decoder.wiki)}
    rows = [{"model": args.model, "recipe": "fp32", "bits": "FP32", "metrics": metrics(model)}]
    print(json.dumps(rows[-1]), flush=True)
    for variant in args.variants.split(","):
        start = time.perf_counter()
        qmodel, _ = quantize(model, batches, recipe=variant_recipe(variant), bits=args.bits, generation=False,
                            progress=False)
        row = {"model": args.model, "recipe": variant, "bits": args.bits,
               "metrics": {**metrics(qmodel), "quantize_s": round(time.perf_counter() - start, 1)}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "env": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                             "args": vars(args)}}, f, indent=2)


if __name__ == "__main__":
    main()
