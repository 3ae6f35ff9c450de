"""SmolLM2 at W4A8 (per-channel int4 weights, simulated: no int4 GEMM kernel on these
backends): ``rotate+gptq+sink`` with min-max (``plain``) or MSE-clipped (``mse``: each row's
range minimises its rounding error, each input column's error weighted by its Gram diagonal)
int4 weight rows, ``seq`` the same with sequential GPTQ (each Linear's Hessian from the model
whose earlier Linears are already rounded). The LM head keeps 8-bit weights below 8 bits
(``linear_weight_spec``). ``--samples`` sets the number of calibration passages (default: the
benchmarks' 32 x 256 tokens).

    .venv/bin/python bench/scripts/w4a8_variants.py plain,mse bench/results/smollm2/accuracy-rotate-gptq-sink-w4a8-head8.json
    .venv/bin/python bench/scripts/w4a8_variants.py seq --samples 128 bench/results/smollm2/accuracy-w4a8-seq-128.json
"""

from __future__ import annotations

import argparse
import dataclasses

from outlierfx.benchmarks import CALIBRATION, accuracy, show_and_write
from outlierfx.passes.gptq import GPTQ
from outlierfx.quantizers.spec import Estimator
from outlierfx.recipes import paper_recipe
from outlierfx.recipes.base import Recipe


def variant(name: str) -> Recipe:
    recipe = paper_recipe("rotate+gptq+sink")
    if name == "plain":
        return recipe
    if name not in ("mse", "seq"):
        raise SystemExit(f"unknown variant {name!r}: plain, mse or seq")
    recipe = dataclasses.replace(recipe, name=f"rotate+gptq+sink {name}", weight_estimator=Estimator.MSE)
    if name == "seq":
        finish = tuple(dataclasses.replace(s, settings={**s.settings, "sequential": True}) if s.pass_type is GPTQ
                       else s for s in recipe.finish)
        recipe = dataclasses.replace(recipe, finish=finish)
    return recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", help="comma-separated: plain, mse, seq")
    parser.add_argument("json")
    parser.add_argument("--samples", type=int, default=CALIBRATION["decoder"]["samples"])
    args = parser.parse_args()
    CALIBRATION["decoder"] = {**CALIBRATION["decoder"], "samples": args.samples}
    show_and_write(accuracy("smollm2", ["W4A8"], [variant(v) for v in args.variants.split(",")]), args.json)


if __name__ == "__main__":
    main()
