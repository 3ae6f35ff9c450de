"""One decode step (batch 1, 256 tokens in the cache) of FP32 eager (the Hugging Face model with its
own cache) and of our int8 cache graph lowered to onednn, interleaved in one process, on a
*generated* Llama with SmolLM2-135M's shapes (random weights: no checkpoint is read):

    PYTHONPATH=$PWD .venv/bin/python bench/scripts/decode_overheads.py --rounds 20

Prints each median and the ratio int8 / FP32 (issue 26's target: <= 0.5). The ratio is what
counts on a shared machine; absolute times move with the load. Uses the decode rows' own steps
(``outlierfx/decode_speed.py``), so it times what ``outlierfx bench speed`` times, and the same
int8 graph with each decode-step overhead put back, as ablations:

- ``+cache copy``: the functional graph, which returns a new copy of every cache per call (as
  before the runtime wrote its caches in place).
"""

from __future__ import annotations

import argparse
import time

import torch

from outlierfx.api import quantize
from outlierfx.decode_speed import CACHE_TOKENS, CachedDecodeStep, EagerDecodeStep
from outlierfx.generation import QuantizedCausalLM
from outlierfx.speed import TimedCall, interleaved_call_medians
from outlierfx.testing import build_model

class Functional(torch.nn.Module):
    """The cache graph behind a plain module: :class:`QuantizedCausalLM` then calls it as it is
    (functional, a new cache per call) instead of its in-place form."""

    def __init__(self, graph: torch.nn.Module) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, **inputs: torch.Tensor) -> tuple:
        return self.graph(**inputs)


SMOLLM2_SHAPES = {"hidden": 576, "heads": 9, "kv_heads": 3, "layers": 30, "ffn": 1536, "vocab": 49152}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--recipe", default=None, help="default: the onednn preset (rotate+sink)")
    parser.add_argument("--backend", default="onednn")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    g = build_model("llama", batch=1, seq=8, pad=False, **SMOLLM2_SHAPES)
    vocab = SMOLLM2_SHAPES["vocab"]
    gen = torch.Generator().manual_seed(1)
    calibration = [{"input_ids": torch.randint(0, vocab, (2, 32), generator=gen)} for _ in range(2)]
    lm, report = quantize(g.model, calibration, args.recipe, backend=args.backend, progress=False)
    tokens = torch.randint(0, vocab, (1, CACHE_TOKENS + 1), generator=gen)
    int8 = f"int8 {args.backend}"
    copying = QuantizedCausalLM(Functional(lm.graph), g.config, lm.first_token_rows)
    steps = {"fp32 eager": EagerDecodeStep(g.model, tokens), int8: CachedDecodeStep(lm, tokens),
             f"{int8} +cache copy": CachedDecodeStep(copying, tokens)}
    print(f"recipe {report.recipe}, first-token rows {lm.first_token_rows}, "
          f"setup {time.perf_counter() - start:.0f}s")
    with torch.no_grad():
        medians = interleaved_call_medians({name: TimedCall(step, step.prepare) for name, step in steps.items()},
                                           args.rounds)
    fp32 = medians["fp32 eager"]
    for name, seconds in medians.items():
        print(f"{name:28} {seconds * 1e3:8.2f} ms/token  x{seconds / fp32:.3f}")


if __name__ == "__main__":
    main()
