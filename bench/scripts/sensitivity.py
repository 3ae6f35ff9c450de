"""Where a quantized model's error comes from: the weights alone, then each activation quantizer
(or each role's quantizers) enabled alone on top of the quantized weights, or (``--leave-out``)
disabled alone with every other quantizer on.

Ranges calibrated with the quantizers upstream already on (PEG, GPTQ) fit the quantized
model's values: enabled alone, a quantizer may then see float values its range never saw (on
SmolLM2 `best+sink` the residual sums alone gave perplexity 31.1, all quantizers 18.8).
``--leave-out`` asks instead what each unit costs in the model as it runs.

    .venv/bin/python bench/scripts/sensitivity.py --model minilm --recipe best --by quantizer --top 30 \
        --json bench/results/minilm/sensitivity.json
    .venv/bin/python bench/scripts/sensitivity.py --model smollm2 --recipe best --by role --windows 8 \
        --json bench/results/smollm2/sensitivity.json

MiniLM: 1 - embedding cosine vs FP32 on 64 held-out paragraphs; SmolLM2: Wikipedia perplexity
on ``--windows`` x 256 held-out tokens. Calibration as ``outlierfx bench accuracy``.
"""

from __future__ import annotations

import argparse
import collections
import json

import torch

from outlierfx.api import quantize
from outlierfx.benchmarks import load_with_calibration
from outlierfx.evaluate import DecoderEval, EncoderEval
from outlierfx.quantizers.observers import FakeQuantize


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--recipe", default="best")
    parser.add_argument("--bits", default="W8A8")
    parser.add_argument("--policy", help="override the recipe's policy: full, linear-inputs, mp16")
    parser.add_argument("--by", choices=["quantizer", "role"], default="role")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--leave-out", action="store_true", help="disable one unit at a time, the rest on")
    parser.add_argument("--json")
    args = parser.parse_args()
    loaded, batches = load_with_calibration(args.model)
    model = loaded.model.eval()
    if loaded.kind == "encoder":
        evaluator = EncoderEval.build(loaded, sentences=64)
        reference = evaluator.embeddings(model)

        def error(m: torch.nn.Module) -> float:
            return 1.0 - float(torch.nn.functional.cosine_similarity(evaluator.embeddings(m), reference).mean())
        metric = "1 - cosine"
    else:
        windows = DecoderEval.build(loaded, windows=args.windows).wiki

        def error(m: torch.nn.Module) -> float:
            return DecoderEval.perplexity(m, windows)
        metric = "ppl_wiki"
    qmodel, _ = quantize(model, batches, recipe=args.recipe, bits=args.bits, policy=args.policy, generation=False,
                         progress=False)
    quantizers = {n: m for n, m in qmodel.named_children() if isinstance(m, FakeQuantize)}
    result = {"metric": metric, "fp32": error(model), "all": error(qmodel)}
    for fq in quantizers.values():
        fq.enabled = False
    result["weights_only"] = error(qmodel)
    print(json.dumps(result), flush=True)
    units: dict[str, list[FakeQuantize]] = collections.defaultdict(list)
    for name, fq in quantizers.items():
        key = name if args.by == "quantizer" else "+".join(sorted(r.value for r in fq.roles))
        units[key].append(fq)
    rows = []
    if args.leave_out:
        for fq in quantizers.values():
            fq.enabled = True
    for key, members in units.items():
        for fq in members:
            fq.enabled = not args.leave_out
        rows.append({"unit": key, "quantizers": len(members), "spec": members[0].spec.describe(),
                     metric: error(qmodel)})
        for fq in members:
            fq.enabled = args.leave_out
        if args.by == "role":
            print(json.dumps(rows[-1]), flush=True)
    rows.sort(key=lambda r: r[metric], reverse=not args.leave_out)
    if args.by == "quantizer":
        for row in rows[: args.top]:
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**result, "rows": rows, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
