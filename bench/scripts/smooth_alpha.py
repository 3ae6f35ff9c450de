"""The SmoothQuant alpha of ``smooth``'s initial scales, and which sites get them (MiniLM,
W8A8, linear-inputs, MSE weight rows, no training: the init alone).

    .venv/bin/python bench/scripts/smooth_alpha.py --alphas 0.5,0.7,0.8,0.9,1.0 \
        --json bench/results/minilm/smooth-alpha.json

Each row: embedding cosine vs FP32 on 64 held-out paragraphs, with scales at every Linear input
(``explicit``) and at the norm -> Linear edges only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from outlierfx.api import quantize
from outlierfx.benchmarks import load_with_calibration
from outlierfx.evaluate import EncoderEval
from outlierfx.quantizers.spec import Estimator
from outlierfx.recipes import quadapter_recipe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--alphas", default="0.5,0.8,1.0")
    parser.add_argument("--steps", type=int, default=0, help="block-wise training steps after the init")
    parser.add_argument("--json")
    args = parser.parse_args()
    loaded, batches = load_with_calibration("minilm")
    model = loaded.model.eval()
    evaluator = EncoderEval.build(loaded, sentences=64)
    reference = evaluator.embeddings(model)
    rows = []
    for alpha in (float(a) for a in args.alphas.split(",")):
        for explicit in (True, False):
            recipe = dataclasses.replace(quadapter_recipe("smooth-alpha", explicit=explicit, init="smoothquant",
                                                          alpha=alpha, max_steps=args.steps),
                                         default_policy="linear-inputs", weight_estimator=Estimator.MSE)
            qmodel, _ = quantize(model, batches, recipe=recipe, bits="W8A8", progress=False)
            cosine = float(torch.nn.functional.cosine_similarity(evaluator.embeddings(qmodel), reference).mean())
            rows.append({"alpha": alpha, "sites": "every Linear input" if explicit else "norm -> Linear",
                         "cosine": round(cosine, 4)})
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
