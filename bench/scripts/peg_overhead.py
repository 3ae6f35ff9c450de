"""Latency of PEG lowering: K channel groups per grouped activation -> K int8 sub-GEMMs.

    .venv/bin/python bench/scripts/peg_overhead.py [--json bench/results/minilm/peg-overhead.json]

MiniLM, batch 8 x 128, 2 threads, torch.ao x86 engine, median of interleaved rounds; each row
also carries the embedding cosine vs FP32 (64 held-out Wikipedia paragraphs).
"""

import argparse
import json

import torch

import outlierfx
from outlierfx.benchmarks import CALIBRATION, calibration_batches
from outlierfx.evaluate import EncoderEval
from outlierfx.models import load
from outlierfx.passes.group_channels import GroupChannels
from outlierfx.passes.lower import Lower
from outlierfx.recipes import Recipe, step
from outlierfx.speed import interleaved_medians, speed_inputs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--groups", default="1,3,6,24")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    loaded = load("minilm")
    batches = calibration_batches(loaded, **CALIBRATION["encoder"])
    inputs = speed_inputs(loaded, 8, 128)
    evaluator = EncoderEval.build(loaded, sentences=64)
    reference = evaluator.embeddings(loaded.model)
    models = {"fp32": loaded.model}
    models["naive (per-tensor)"] = outlierfx.quantize(loaded.model, batches, recipe="naive", backend="x86",
                                                       progress=False).model
    for k in (int(g) for g in args.groups.split(",")):
        peg = Recipe(f"peg{k}", f"PEG K={k}", observe=(step(GroupChannels, groups=k),))
        fake = outlierfx.quantize(loaded.model, batches, recipe=peg, progress=False).model
        models[f"peg K={k}"] = Lower("x86", max_sub_gemms=k)(fake).graph_module  # sub-GEMMs whatever the default
    medians = interleaved_medians(models, inputs, args.rounds)
    base, naive = medians["fp32"], medians["naive (per-tensor)"]
    rows = []
    for name, model in models.items():
        latency = medians[name]
        cosine = evaluator.metrics(model, reference)["cosine"]
        rows.append({"model": "minilm", "recipe": name, "backend": "eager" if name == "fp32" else "x86",
                     "metrics": {"latency_ms": round(latency * 1000, 2),
                                 "latency_ratio_vs_fp32": round(latency / base, 3),
                                 "latency_ratio_vs_per_tensor": round(latency / naive, 3),
                                 "cosine": round(cosine, 4)}})
        print(f"{name:20} {latency * 1000:8.1f} ms  x{latency / base:.3f} of FP32  x{latency / naive:.3f} of per-tensor"
              f"  cosine {cosine:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "env": {"torch": torch.__version__, "threads": 2, "batch": 8, "seq": 128}}, f,
                      indent=2)


if __name__ == "__main__":
    main()
