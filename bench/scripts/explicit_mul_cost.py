"""What the explicit ``x * s`` multiplies of ``smooth`` cost on the inductor path.

The same quantized graph twice, compiled with ``compile_int8``: as built, and with every
Quadapter constant multiply left in front of a quantizer removed (wrong numerics, same kernels
otherwise). Interleaved medians in one process; the gap is what folding the rest would gain.

    .venv/bin/python bench/scripts/explicit_mul_cost.py [--rounds 10] \
        [--json bench/results/minilm/explicit-mul-cost.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from outlierfx.api import quantize
from outlierfx.benchmarks import load_with_calibration
from outlierfx.graph.copy import copy_graph_module
from outlierfx.passes.lower import compile_int8
from outlierfx.speed import interleaved_medians, speed_inputs

CONSTANT_PREFIX = "outlierfx_quadapter_scale_"  # FoldQuadapter's kept x * s constants


def without_explicit_multiplies(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, int]:
    work = copy_graph_module(gm)
    removed = 0
    for node in list(work.graph.nodes):
        if node.target is torch.ops.aten.mul.Tensor and isinstance(node.args[1], torch.fx.Node) \
                and str(node.args[1].target).startswith(CONSTANT_PREFIX):
            node.replace_all_uses_with(node.args[0])
            work.graph.erase_node(node)
            removed += 1
    work.graph.eliminate_dead_code()
    work.recompile()
    return work, removed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded, batches = load_with_calibration(args.model)
    model = loaded.model.eval()
    qmodel, _ = quantize(model, batches, recipe="smooth", generation=False, progress=False)
    bare, removed = without_explicit_multiplies(qmodel)
    inputs = speed_inputs(loaded, 8, 128) if loaded.kind == "encoder" else speed_inputs(loaded, 1, 256)
    models = {"fp32": model, "smooth": compile_int8(qmodel), "smooth without x * s": compile_int8(bare)}
    medians = interleaved_medians(models, inputs, args.rounds)
    result = {"explicit_multiplies": removed, "threads": args.threads, "rounds": args.rounds,
              "ms": {k: round(v * 1000, 2) for k, v in medians.items()},
              "ratio_vs_fp32": {k: round(v / medians["fp32"], 3) for k, v in medians.items()}}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
