"""GPTQ's first-row corrections on generated decoders with injected outliers (no pretrained
attention sink): how the W4A8 model's held-out logit error moves with them.

    .venv/bin/python bench/scripts/first_row_generated.py --json bench/results/generated/first-row-corrections.json

Each case is a generated model of one family (random weights, outlier channels, optionally a
massive first token: one id only position 0 holds, so every text's first rows are alike), GPTQ
at W4A8 (``linear-inputs``, per-channel int4 rows) with and without ``first_rows``, calibrated on
one batch and scored on another batch of the same model: the mean squared logit error against
the float model at every real position after the first.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics

import torch

import outlierfx
from outlierfx.passes import PassManager
from outlierfx.passes.convert_fake_quant import ConvertToFakeQuant
from outlierfx.passes.gptq import GPTQ
from outlierfx.passes.insert_observers import InsertObservers
from outlierfx.quantizers.calibrate import calibrate
from outlierfx.quantizers.policy import make_policy
from outlierfx.testing import OutlierSpec, build_model

SHAPE = {"layers": 4, "hidden": 64, "ffn": 128, "batch": 16, "seq": 32, "tied": False}


def logit_error(model: torch.nn.Module, reference: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    """Mean squared logit error at every real position after each text's first."""
    with torch.no_grad():
        gap = model(**inputs).logits - reference(**inputs).logits
    later = inputs["attention_mask"].bool().clone()
    later[:, 0] = False
    return float(gap[later].pow(2).mean())


def case(family: str, first_token_scale: float, seed: int) -> dict[str, object]:
    outliers = OutlierSpec(gamma_scale=10.0, channels=(3,), first_token_scale=first_token_scale)
    g = build_model(family, seed=seed, outliers=outliers, **SHAPE)
    held_out = build_model(family, seed=seed + 1000, outliers=outliers, **SHAPE).inputs  # only its inputs: other ids
    policy = make_policy("linear-inputs", "W4A8")
    observed = PassManager([InsertObservers(policy)])(outlierfx.capture(g.model, g.inputs)).graph_module
    calibrate(observed, [g.inputs], progress=False)
    errors = {}
    for first_rows in (False, True):
        rounded = GPTQ([g.inputs], policy.weight, policy.embedding, first_rows=first_rows)(observed).graph_module
        converted = ConvertToFakeQuant(policy.weight, policy.embedding)(rounded).graph_module
        errors[first_rows] = logit_error(converted, g.model, held_out)
    return {"family": family, "first_token_scale": first_token_scale, "seed": seed, "without": errors[False],
            "with": errors[True], "ratio": errors[True] / errors[False]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="llama,qwen2,mistral,gemma")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    rows = []
    for family, scale, seed in itertools.product(args.families.split(","), (1.0, 100.0), range(args.seeds)):
        rows.append(case(family, scale, seed))
        print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for family, scale in itertools.product(args.families.split(","), (1.0, 100.0)):
        ratios = [r["ratio"] for r in rows if r["family"] == family and r["first_token_scale"] == scale]
        summary[f"{family}, first token x{scale:g}"] = {"geometric_mean_ratio": statistics.geometric_mean(ratios),
                                                      "better": sum(r < 1 for r in ratios), "of": len(ratios)}
    print(json.dumps(summary, indent=1))
    with open(args.json, "w") as f:
        json.dump({"shape": SHAPE, "rows": rows, "summary": summary}, f, indent=2)


if __name__ == "__main__":
    main()
