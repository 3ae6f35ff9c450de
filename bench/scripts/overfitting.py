"""Quadapter's claim, tested (issue 6): trained on a small slice of Wikipedia, does Quadapter
overfit less than QAT? Each method quantizes SmolLM2 from the same ``--train`` paragraphs
(calibration and training data alike) and is evaluated on those paragraphs (train), on held-out
Wikipedia (in distribution) and on news articles (out of distribution).

    .venv/bin/python bench/scripts/overfitting.py --methods naive,quadapter,smooth,qat \
        --json bench/results/smollm2/overfitting.json

Methods: ``naive`` (PTQ, no training), ``quadapter`` (norm -> Linear scales, block-wise, then
phase 2 end to end on the LM loss), ``smooth`` (Quadapter scales on every Linear input),
``qat`` (every Linear weight trained on the LM loss), ``os`` (gamma migration + token-wise
clipping search; slow on SmolLM2). Policy ``linear-inputs`` by default: under ``full`` every
method leaves SmolLM2 at perplexities in the tens of thousands (the residual-stream error of
issue 5), where a train/held-out gap means nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from outlierfx import corpus
from outlierfx.api import quantize
from outlierfx.evaluate import DecoderEval
from outlierfx.models import load
from outlierfx.passes.qat import QAT
from outlierfx.passes.training import lm_loss
from outlierfx.recipes import RECIPES, Need, Recipe, quadapter_recipe, step


def train_perplexity(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Perplexity over the real next-token targets of the training batches."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            n = int(b["attention_mask"][:, 1:].sum())
            total += float(lm_loss(model(**b), b)) * n
            count += n
    return math.exp(total / count)


def methods(args: argparse.Namespace) -> dict[str, Recipe]:
    qat = step(QAT, {"batches": Need.BATCHES, "weight_spec": Need.QUANTIZED_WEIGHTS,
                     "embedding_spec": Need.EMBEDDING_SPEC, "progress": Need.PROGRESS},
               epochs=args.qat_epochs, lr=args.qat_lr)
    block = {"max_steps": args.block_steps, "max_batches": len(range(0, args.train, args.batch)),
             "end_to_end_steps": args.phase2_steps, "end_to_end_lr": args.phase2_lr}
    return {
        "naive": RECIPES["naive"],
        "quadapter": quadapter_recipe("quadapter", init="smoothquant", alpha=0.8, **block),
        "smooth": quadapter_recipe("smooth", explicit=True, init="smoothquant", alpha=0.8, **block),
        "qat": Recipe("qat", "QAT", finish=(qat,)),
        "os": RECIPES["os"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--methods", default="naive,quadapter,smooth,qat")
    parser.add_argument("--policy", default="linear-inputs")
    parser.add_argument("--bits", default="W8A8")
    parser.add_argument("--train", type=int, default=64, help="training paragraphs (<= 256 tokens each)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--windows", type=int, default=24, help="held-out windows of 256 tokens per corpus")
    parser.add_argument("--qat-epochs", type=int, default=3)
    parser.add_argument("--qat-lr", type=float, default=1e-5)
    parser.add_argument("--block-steps", type=int, default=40)
    parser.add_argument("--phase2-steps", type=int, default=48)
    parser.add_argument("--phase2-lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load(args.model)
    model = loaded.model.eval()
    batches = corpus.calibration_batches(loaded, corpus.wikipedia_sample("calibration", args.train), 256, args.batch)
    evaluator = DecoderEval.build(loaded, windows=args.windows)
    rows = [{"method": "fp32", "train": train_perplexity(model, batches), **evaluator.metrics(model)}]
    print(json.dumps(rows[-1]), flush=True)
    recipes = methods(args)
    for name in args.methods.split(","):
        start = time.perf_counter()
        qmodel, report = quantize(model, batches, recipe=recipes[name], bits=args.bits, policy=args.policy,
                                  generation=False, progress=True)
        seconds = time.perf_counter() - start
        trainers = [e.plan for e in report.audit if e.pass_name in ("QAT", "TrainQuadapter")]
        params = sum(p.parameters for p in trainers)
        rows.append({"method": name, "train": train_perplexity(qmodel, batches), **evaluator.metrics(qmodel),
                     "trained_parameters": params, "quantize_s": round(seconds, 1),
                     "training": [p.summary() for p in trainers]})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "env": {"torch": torch.__version__, "args": vars(args)}}, f, indent=2)


if __name__ == "__main__":
    main()
