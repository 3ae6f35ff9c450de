"""Prefill latency of `naive` and `naive+sink` (linear-inputs) lowered to one eager engine,
interleaved with FP32 eager in one process (no compiled model in the process), and the
perplexity of the lowered `naive+sink`:

    .venv/bin/python bench/scripts/sink_speed.py --model smollm2 --backend onednn --rounds 6 \
        --json bench/results/smollm2/sink-speed.json

What the first-token grid costs at run time, apart from `outlierfx bench speed` (which also
compiles FP32 with inductor in the same process).
"""

from __future__ import annotations

import argparse
import json

import torch

from outlierfx.api import lower, quantize
from outlierfx.benchmarks import CALIBRATION, calibration_batches, write_json
from outlierfx.evaluate import DecoderEval, EncoderEval
from outlierfx.models import load
from outlierfx.speed import SHAPES, interleaved_medians, speed_inputs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--backend", default="onednn")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    loaded = load(args.model)
    model = loaded.model.eval()
    inputs = speed_inputs(loaded, *SHAPES[loaded.kind])
    calibration = calibration_batches(loaded, **CALIBRATION[loaded.kind])
    models = {"fp32": model}
    for recipe in ("naive", "naive+sink"):
        fake, report = quantize(model, calibration, recipe=recipe, policy="linear-inputs", generation=False,
                                progress=False)
        models[recipe] = lower(fake, report, args.backend).model
    medians = interleaved_medians(models, inputs, args.rounds)
    result = {name: {"ms": round(s * 1e3, 1), "vs_fp32": round(s / medians["fp32"], 3)} for name, s in medians.items()}
    evaluator = DecoderEval.build(loaded) if loaded.kind == "decoder" else EncoderEval.build(loaded)
    reference = None if loaded.kind == "decoder" else evaluator.embeddings(model)
    result["naive+sink"]["quality"] = evaluator.metrics(models["naive+sink"], reference)
    result["args"] = vars(args)
    print(json.dumps(result, indent=1))
    if args.json:
        write_json(result, args.json)


if __name__ == "__main__":
    main()
