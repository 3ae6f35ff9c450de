"""One int8 GEMM per engine against FP32 ``F.linear``: MiniLM's three Linear shapes, batch 8 x 128.

Each row times the :class:`~outlierfx.backends.int8_linear.QuantizedLinear` our lowering
emits, float input quantized inside, float output: what every Linear of a ``linear-inputs``
model runs. Median of 50 calls after 5 warm-up calls, 2 threads, one process.

    .venv/bin/python bench/scripts/int8_gemm.py [--json bench/results/kernels/int8-gemm.json]

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
from outlierfx.backends.runtime import has_int8_instructions

SHAPES = [(1024, 384, 384), (1024, 384, 1536), (1024, 1536, 384)]  # tokens, in, out


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
    args = parser.parse_args()
    torch.set_num_threads(2)
    engines = [e for e in EAGER_ENGINES if e in torch.backends.quantized.supported_engines and e in FLOAT_OUTPUT_ENGINES]
    rows = []
    with torch.no_grad():
        for tokens, d_in, d_out in SHAPES:
            x, weight, bias = torch.randn(tokens, d_in), torch.randn(d_out, d_in), torch.randn(d_out)
            scale = weight.abs().amax(1) / 127
            codes = torch.round(weight / scale[:, None]).to(torch.int8)
            fp32 = median_ms(lambda x=x, weight=weight, bias=bias: torch.nn.functional.linear(x, weight, bias))
            row = {"shape": [tokens, d_in, d_out], "fp32_ms": round(fp32, 3)}
            for engine in engines:
                linear = QuantizedLinear(codes, scale, bias, (float(x.abs().max()) / 127, 128, 0, 255), None, engine)
                row[f"{engine}_vs_fp32"] = round(median_ms(lambda linear=linear, x=x: linear(x)) / fp32, 3)
            rows.append(row)
            print(row, flush=True)
    env = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "threads": 2,
           "int8_instructions": has_int8_instructions()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "env": env}, f, indent=1)


if __name__ == "__main__":
    main()
