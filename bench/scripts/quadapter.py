"""Quadapter accuracy on the packaged models: recipes x bit widths, FP32 reference.

    .venv/bin/python bench/scripts/quadapter.py --model minilm --bits W8A8 \
        --recipes naive,quadapter:identity,quadapter:smoothquant \
        --json bench/results/minilm/quadapter.json
    .venv/bin/python bench/scripts/quadapter.py --model smollm2 --bits W8A8 --recipes quadapter:identity \
        --max-steps 40 \
        --json bench/results/smollm2/quadapter.json

A recipe ``quadapter:<init>`` / ``os+quadapter:<init>`` trains with that init and with the weight
spec of the bit width (quantize hands every recipe its policy). Calibration
and training use the same batches as ``outlierfx bench accuracy``; evaluation is held out.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from outlierfx.api import quantize
from outlierfx.benchmarks import load_with_calibration
from outlierfx.evaluate import DecoderEval, EncoderEval
from outlierfx.recipes import quadapter_recipe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--bits", nargs="+", default=["W8A8"])
    parser.add_argument("--recipes", default="naive,quadapter:identity,quadapter:smoothquant")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--max-batches", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--windows", type=int, default=24)
    parser.add_argument("--no-fp32", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded, batches = load_with_calibration(args.model)
    evaluator = (EncoderEval.build(loaded) if loaded.kind == "encoder"
                 else DecoderEval.build(loaded, windows=args.windows))
    model = loaded.model.eval()
    reference = evaluator.embeddings(model) if loaded.kind == "encoder" else None
    rows = []
    if not args.no_fp32:
        rows.append({"model": args.model, "recipe": "fp32", "bits": "FP32", "metrics": evaluator.metrics(model, None)})
        print(json.dumps(rows[-1]), flush=True)
    for bits in args.bits:
        for name in args.recipes.split(","):
            recipe = name
            if ":" in name:
                base, init = name.split(":")
                # trains with the policy's weight spec and quantize's progress setting (off)
                recipe = quadapter_recipe(name, os=base.startswith("os+"), init=init, max_steps=args.max_steps,
                                          max_batches=args.max_batches, lr=args.lr)
            start = time.perf_counter()
            qmodel, report = quantize(model, batches, recipe=recipe, bits=bits, generation=False, progress=False)
            seconds = time.perf_counter() - start
            metrics = evaluator.metrics(qmodel, reference)
            metrics["quantize_s"] = round(seconds, 1)
            train = next((e.plan for e in report.audit if e.pass_name == "TrainQuadapter"), None)
            if train is not None:
                metrics["train_s"] = round(train.seconds, 1)
                metrics["train_steps"] = sum(b.steps for b in train.blocks)
                metrics["block_mse_before"] = sum(b.loss_before for b in train.blocks)
                metrics["block_mse_after"] = sum(b.loss_after for b in train.blocks)
            rows.append({"model": args.model, "recipe": name, "bits": bits, "metrics": metrics})
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "env": {"torch": torch.__version__, "threads": 1, "args": vars(args)}}, f,
                      indent=2)


if __name__ == "__main__":
    main()
