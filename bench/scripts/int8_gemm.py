"""One int8 GEMM per engine against FP32 ``F.linear``: MiniLM's three Linear shapes, batch 8 x 128,
or (``--model smollm2``) SmolLM2-135M's prefill GEMMs at 1 x 256 tokens as our lowering runs
them (Q/K/V and gate/up merged), with the whole forward's GEMM time as a ratio: the floor under
any int8 model's latency ratio on this CPU, whatever runs between the GEMMs. For SmolLM2 it also
times, in the same process, the float work no int8 GEMM removes (each layer's attention, and the
online Hadamard the ``rotate`` presets add before ``down_proj``) and FP32 eager's whole forward,
so the floor is a ratio of one run: int8 GEMMs + float attention (+ Hadamard) over FP32 eager.

Each row times the :class:`~outlierfx.backends.int8_linear.QuantizedLinear` our lowering
emits, float input quantized inside, float output: what every Linear of a ``linear-inputs``
model runs. Median of 50 calls after 5 warm-up calls, 2 threads, one process.

    .venv/bin/python bench/scripts/int8_gemm.py [--json bench/results/kernels/int8-gemm.json]
    .venv/bin/python bench/scripts/int8_gemm.py --model smollm2 --json bench/results/kernels/int8-gemm-smollm2.json

fbgemm/x86 on the two 384-input shapes is bimodal across processes on this machine (about 0.35x
or 0.8x FP32, stable within one process); onednn (AMX here) stays at 0.13-0.30x.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

from outlierfx.backends.int8_linear import EAGER_ENGINES, FLOAT_OUTPUT_ENGINES, QuantizedLinear
from outlierfx.backends.runtime import cpu_description, has_int8_instructions

# (tokens, in, out, GEMMs per forward)
SHAPES = {"minilm": [(1024, 384, 384, 1), (1024, 384, 1536, 1), (1024, 1536, 384, 1)],
          # 30 layers: Q/K/V merged (576 -> 576 + 2 x 192), O, gate/up merged, down; the LM head once
          "smollm2": [(256, 576, 960, 30), (256, 576, 576, 30), (256, 576, 3072, 30), (256, 1536, 576, 30),
                      (256, 576, 49152, 1)]}


def median_ms(fn: Callable[[], object], calls: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--model", choices=sorted(SHAPES), default="minilm")
    args = parser.parse_args()
    torch.set_num_threads(2)
    engines = [e for e in EAGER_ENGINES if e in torch.backends.quantized.supported_engines and e in FLOAT_OUTPUT_ENGINES]
    rows = []
    with torch.no_grad():
        for tokens, d_in, d_out, count in SHAPES[args.model]:
            x, weight, bias = torch.randn(tokens, d_in), torch.randn(d_out, d_in), torch.randn(d_out)
            scale = weight.abs().amax(1) / 127
            codes = torch.round(weight / scale[:, None]).to(torch.int8)
            fp32 = median_ms(lambda x=x, weight=weight, bias=bias: torch.nn.functional.linear(x, weight, bias))
            row = {"shape": [tokens, d_in, d_out], "per_forward": count, "fp32_ms": round(fp32, 3)}
            for engine in engines:
                linear = QuantizedLinear(codes, scale, bias, (float(x.abs().max()) / 127, 128, 0, 255), None, engine)
                ms = median_ms(lambda linear=linear, x=x: linear(x))
                row[f"{engine}_ms"], row[f"{engine}_vs_fp32"] = round(ms, 3), round(ms / fp32, 3)
            rows.append(row)
            print(row, flush=True)
    fp32_total = sum(r["fp32_ms"] * r["per_forward"] for r in rows)
    forward = {"fp32_ms": round(fp32_total, 1)}
    for engine in engines:
        total = sum(r[f"{engine}_ms"] * r["per_forward"] for r in rows)
        forward[f"{engine}_ms"], forward[f"{engine}_vs_fp32"] = round(total, 1), round(total / fp32_total, 3)
    print("all GEMMs of one forward:", forward)
    if args.model == "smollm2":
        forward |= float_floor(forward)
        print("floor:", {k: v for k, v in forward.items() if "floor" in k or "forward_ms" in k or "attention" in k})
    env = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
           "cpu_description": cpu_description(), "threads": 2, "int8_instructions": has_int8_instructions()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "rows": rows, "forward_gemms": forward, "env": env}, f, indent=1)


@torch.no_grad()
def float_floor(forward: dict[str, float]) -> dict[str, float]:
    """SmolLM2's float work that every int8 path of ours keeps, per forward (30 layers, 1 x 256):
    causal attention on 9 heads of 64 (keys and values expanded from 3), the online Hadamard on
    the 1536-wide FFN activation; FP32 eager's forward; and the resulting floor ratios."""
    from outlierfx.graph.hadamard_op import HADAMARD
    from outlierfx.models import load
    from outlierfx.quantizers.hadamard import kronecker_hadamard
    from outlierfx.speed import SHAPES as SPEED_SHAPES, speed_inputs

    layers = 30
    q, k, v = (torch.randn(1, 9, 256, 64) for _ in range(3))
    attention = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)) * layers
    rotation = kronecker_hadamard(1536)
    left, right, activation = rotation.left.matrix.float(), rotation.right.matrix.float(), torch.randn(1, 256, 1536)
    hadamard = median_ms(lambda: HADAMARD(activation, left, right)) * layers
    loaded = load("smollm2")
    inputs = speed_inputs(loaded, *SPEED_SHAPES["decoder"])
    model = loaded.model.eval()
    fp32_forward = median_ms(lambda: model(**inputs), calls=10)
    result = {"attention_ms": round(attention, 1), "hadamard_ms": round(hadamard, 1),
              "fp32_eager_forward_ms": round(fp32_forward, 1)}
    for engine in [k.removesuffix("_ms") for k in forward if k.endswith("_ms") and k != "fp32_ms"]:
        gemms = forward[f"{engine}_ms"]
        result[f"{engine}_floor_vs_fp32_eager"] = round((gemms + attention) / fp32_forward, 3)
        result[f"{engine}_floor_with_hadamard_vs_fp32_eager"] = round((gemms + attention + hadamard) / fp32_forward, 3)
    return result


if __name__ == "__main__":
    main()
