"""What each of the ``rotate`` recipe's rotations contributes (SmolLM2 by default, W8A8,
per-tensor static activations on every Linear input, first token on its own grid).

    .venv/bin/python bench/scripts/rotation_ablation.py --json bench/results/smollm2/rotation-ablation.json
    .venv/bin/python bench/scripts/rotation_ablation.py --backend onednn ...   # scored after lowering

Rows: ``rotate+sink`` with one rotation left out at a time (the residual stream, the per-head
values, the online Hadamard before each FFN output Linear), and with only gamma migration.
Simulated (fake quant) unless ``--backend`` is given. ``naive+sink`` and the full recipe are
rows of ``outlierfx bench accuracy`` (bench/results/smollm2/accuracy-rotate*.json).
"""

from __future__ import annotations

import argparse
import dataclasses

from outlierfx.benchmarks import accuracy, show_and_write
from outlierfx.recipes import paper_recipe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--bits", default="W8A8")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--leave-out", default="RotateFFN,RotateHeads,RotateResidual,all",
                        help="comma-separated rotation passes to leave out, one row each ('all': gamma migration only)")
    parser.add_argument("--json")
    args = parser.parse_args()
    full = paper_recipe("rotate+sink")
    recipes = []
    for left_out in args.leave_out.split(","):
        kept = tuple(s for s in full.prepare if left_out != "all" and s.pass_type.__name__ != left_out
                     or s.pass_type.__name__ == "MigrateGamma")
        name = f"rotate+sink without {left_out}" if left_out != "all" else "rotate+sink, gamma migration only"
        recipes.append(dataclasses.replace(full, name=name, prepare=kept))
    show_and_write(accuracy(args.model, [args.bits], recipes, backend=args.backend), args.json)


if __name__ == "__main__":
    main()
