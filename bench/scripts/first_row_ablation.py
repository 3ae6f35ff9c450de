"""What GPTQ's first-row corrections contribute to the preset below 8-bit weights (SmolLM2
W4A8 by default), each model lowered to a backend and scored on its int8 kernels.

    .venv/bin/python bench/scripts/first_row_ablation.py --backend onednn \
        --json bench/results/smollm2/w4a8-first-row-corrections-onednn.json

Rows: the ``fast`` preset at ``--bits`` as ``quantize()`` picks it for the model's graph
(``presets.preset``), and the same recipe with ``GPTQ(first_rows=False)``. One process, the same
calibration set; nothing else differs.
"""

from __future__ import annotations

import argparse
import dataclasses

from outlierfx.benchmarks import accuracy, load_with_calibration, show_and_write
from outlierfx.graph import capture
from outlierfx.passes.gptq import GPTQ
from outlierfx.quantizers.policy import parse_bits
from outlierfx.recipes.presets import preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--bits", default="W4A8")
    parser.add_argument("--backend", default="onednn")
    parser.add_argument("--json")
    args = parser.parse_args()
    loaded, batches = load_with_calibration(args.model)
    chosen = preset("fast", args.backend, capture(loaded.model.eval(), batches[0]), parse_bits(args.bits)).recipe
    del loaded, batches
    if not any(s.pass_type is GPTQ and s.settings.get("first_rows") for s in chosen.finish):
        raise SystemExit(f"the preset at {args.bits} ({chosen.name}) has no first-row corrections to leave out")
    without = dataclasses.replace(chosen, name=f"{chosen.name} without first-row corrections", finish=tuple(
        dataclasses.replace(s, settings={**s.settings, "first_rows": False}) if s.pass_type is GPTQ else s
        for s in chosen.finish))
    show_and_write(accuracy(args.model, [args.bits], [chosen, without], backend=args.backend), args.json)


if __name__ == "__main__":
    main()
