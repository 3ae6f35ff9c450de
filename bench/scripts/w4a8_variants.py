"""SmolLM2 at W4A8 (per-channel int4 weights, simulated: no int4 GEMM kernel on these
backends): ``rotate+gptq+sink`` with min-max (``plain``) or MSE-clipped (``mse``) int4 weight rows.
The LM head keeps 8-bit weights below 8 bits (``linear_weight_spec``).

    .venv/bin/python bench/scripts/w4a8_variants.py plain,mse bench/results/smollm2/accuracy-rotate-gptq-sink-w4a8-head8.json
"""

from __future__ import annotations

import dataclasses
import sys

from outlierfx.benchmarks import accuracy, print_table, write_json
from outlierfx.quantizers.spec import Estimator
from outlierfx.recipes import paper_recipe


def main() -> None:
    recipes = []
    for variant in sys.argv[1].split(","):
        recipe = paper_recipe("rotate+gptq+sink")
        if variant == "mse":
            recipe = dataclasses.replace(recipe, name="rotate+gptq+sink mse", weight_estimator=Estimator.MSE)
        elif variant != "plain":
            raise SystemExit(f"unknown variant {variant!r}: plain or mse")
        recipes.append(recipe)
    result = accuracy("smollm2", ["W4A8"], recipes)
    print_table(result)
    write_json(result, sys.argv[2])


if __name__ == "__main__":
    main()
