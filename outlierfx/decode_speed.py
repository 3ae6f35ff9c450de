"""The decode rows of ``outlierfx bench speed`` for a causal LM: the latency of one decode step
(one new token) at batch 1 with :data:`CACHE_TOKENS` tokens already in the cache.

- FP32 eager (and torch.ao dynamic, a module swap of the same Hugging Face model): the model
  with its own cache. The first :data:`CACHE_TOKENS` tokens are prefilled once; each timed call
  is one ``model(next_token, cache=cache, use_cache=True)`` on a copy of the prefilled
  cache made (untimed) before the call, so the cache holds :data:`CACHE_TOKENS` tokens every
  time (the step appends one).
- Ours: the cached decoder (the graph of :func:`~outlierfx.quantize`'s causal LM, one
  quantization per recipe) lowered to each backend. Its own prefill fills a static cache of
  :data:`CACHE_TOKENS` + 1 columns; each timed call is the decode step at the last column, as
  :meth:`~outlierfx.generation.QuantizedCausalLM.generate` runs it (the new token alone).
  The step writes its keys and values in place (:meth:`~outlierfx.generation.QuantizedCausalLM.cache_writer`),
  always into the last column, so the prefilled columns it reads stay as they are.
- torchao PT2E x86 (where torchao is installed): the same float cache graph
  (:class:`~outlierfx.graph.kv_cache.CachedDecoder`) quantized by its ``X86InductorQuantizer``,
  calibrated on the same prompt batches, compiled by inductor, run like ours.

The decode rows of ours carry the perplexity of that same int8 cache graph on
:data:`PPL_WINDOWS` held-out Wikipedia windows scored two ways: in one full-sequence call
(``ppl_full``) and through the cache one token per call (``ppl_incremental``); FP32's row
carries the float model's ``ppl_full`` on the same windows.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch

from .api import QuantizationResult, lower, quantize
from .evaluate import DecoderEval
from .generation import QuantizedCausalLM, incremental_perplexity
from .graph.kv_cache import CachedDecoder, empty_cache, prefill_batches
from .models import LoadedModel
from .recipes import Recipe
from .speed import TimedCall, torchao_pt2e

CACHE_TOKENS = 256
PPL_WINDOWS = 2  # windows of CACHE_TOKENS tokens: the same cache length as the timed steps


class EagerDecodeStep:
    """One decode step of a Hugging Face causal LM with its own cache, after a prefill of all of
    ``tokens`` ``[1, n + 1]`` but the last (the token each step decodes)."""

    def __init__(self, model: torch.nn.Module, tokens: torch.Tensor) -> None:
        self.model, self.next = model, tokens[:, -1:]
        with torch.no_grad():
            self.prefilled = model(input_ids=tokens[:, :-1], use_cache=True).cache
        self.cache = copy.deepcopy(self.prefilled)

    def prepare(self) -> None:
        self.cache = copy.deepcopy(self.prefilled)  # the step appends to the cache it is given

    def __call__(self) -> torch.Tensor:
        """The scores ``[1, vocab]`` predicting the token after ``tokens``."""
        return self.model(input_ids=self.next, cache=self.cache, use_cache=True).logits[:, -1]


class CachedDecodeStep:
    """One decode step of a :class:`~outlierfx.generation.QuantizedCausalLM` (its cached graph),
    after its own prefill of all of ``tokens`` ``[1, n + 1]`` but the last, in a static cache of
    ``n + 1`` columns: the step writes the last column and reads the prefilled ones."""

    def __init__(self, lm: QuantizedCausalLM, tokens: torch.Tensor) -> None:
        self.lm, self.tokens = lm, tokens
        self.filled = torch.ones_like(tokens)
        prompt = tokens.shape[1] - 1
        keys, values = empty_cache(lm.config, 1, tokens.shape[1], lm.cache_dtype)
        with torch.no_grad():
            _, self.keys, self.values = lm.run_rows(tokens, self.filled, list(range(prompt)), prompt - 1, keys, values)
        self.rows = [prompt]

    def prepare(self) -> None:
        pass  # each step rewrites the last column only: the prefilled ones stay as they are

    def __call__(self) -> torch.Tensor:
        """The scores ``[1, vocab]`` predicting the token after ``tokens``."""
        return self.lm.run_rows(self.tokens, self.filled, self.rows, self.rows[-1], self.keys, self.values)[0]


DecodeStep = EagerDecodeStep | CachedDecodeStep


@dataclasses.dataclass
class DecodeCandidate:
    name: str
    backend: str
    step: DecodeStep
    setup_s: float
    scored: Any = None  # what the quality metrics score: the FP32 model, or our QuantizedCausalLM

    def timed(self) -> TimedCall:
        return TimedCall(self.step, self.step.prepare)


def decode_tokens(loaded: LoadedModel) -> torch.Tensor:
    """``[1, CACHE_TOKENS + 1]`` held-out Wikipedia tokens: the cache's, then the decoded one."""
    return DecoderEval.build(loaded, window=CACHE_TOKENS + 1, windows=1).wiki


def decode_candidates(loaded: LoadedModel, calibration: Sequence[dict[str, torch.Tensor]],
                      ours: Sequence[tuple[str, str, Recipe]], bits: str, policy: str | None,
                      peers: Sequence[tuple[str, str, torch.nn.Module]], torchao: bool,
                      say: Any = lambda *a, **k: None) -> list[DecodeCandidate]:
    """FP32 eager, then ``ours`` (label, backend, recipe: each recipe's cache graph quantized
    once, lowered per backend), then ``peers`` (name, backend, a Hugging Face model with its own
    cache, e.g. torch.ao dynamic), then torchao PT2E on the cache graph if ``torchao``."""
    model, config = loaded.model, loaded.model.config
    tokens = decode_tokens(loaded)
    found = [DecodeCandidate("fp32", "eager", EagerDecodeStep(model, tokens), 0.0, model)]
    simulated: dict[str, tuple[QuantizationResult, float]] = {}  # recipe name -> (fake-quant result, seconds)
    for label, backend, recipe in ours:
        if recipe.name not in simulated:
            start = time.perf_counter()
            result = quantize(model, calibration, recipe=recipe, bits=bits, policy=policy, backend="fake-quant",
                              progress=False)
            simulated[recipe.name] = (result, time.perf_counter() - start)
            say(f"quantized the cache graph ({recipe.name}, {bits}) in {simulated[recipe.name][1]:.1f}s")
        (fake, report), quantize_s = simulated[recipe.name]
        start = time.perf_counter()
        lm = lower(fake, report, backend).model
        step = CachedDecodeStep(lm, tokens)  # the prefill (inductor: compiles it)
        with torch.no_grad():
            step()  # inductor: compiles the decode step
        found.append(DecodeCandidate(label, backend, step, quantize_s + time.perf_counter() - start, lm))
        say(f"cache graph lowered to {backend} and prefilled in {time.perf_counter() - start:.1f}s")
    for name, backend, peer in peers:
        found.append(DecodeCandidate(name, backend, EagerDecodeStep(peer, tokens), 0.0))
    if torchao:
        start = time.perf_counter()
        cache_batches = prefill_batches(config, calibration[:4])
        pt2e = torchao_pt2e(CachedDecoder(copy.deepcopy(model)), cache_batches)
        if pt2e is not None:
            step = CachedDecodeStep(QuantizedCausalLM(pt2e, config), tokens)
            with torch.no_grad():
                step()
            found.append(DecodeCandidate("torchao pt2e x86", "inductor", step, time.perf_counter() - start))
    return found



def decode_rows(model_name: str, bits: str, candidates: Sequence[DecodeCandidate], seconds: Sequence[float],
                windows: torch.Tensor | None) -> list[dict[str, Any]]:
    """One row per candidate (``"phase": "decode"``): ``decode_ms`` per token and its ratio to
    FP32 eager's (the first candidate); with ``windows``, the perplexities (module docstring)."""
    rows = []
    for candidate, latency in zip(candidates, seconds):
        metrics: dict[str, Any] = {"decode_ms": round(latency * 1000, 2),
                                   "decode_ratio_vs_fp32": round(latency / seconds[0], 3)}
        if windows is not None and candidate.scored is not None:
            metrics["ppl_full"] = round(DecoderEval.perplexity(candidate.scored, windows, batch=1), 4)
            if isinstance(candidate.scored, QuantizedCausalLM):
                metrics["ppl_incremental"] = round(incremental_perplexity(candidate.scored, windows), 4)
        metrics["setup_s"] = round(candidate.setup_s, 1)
        rows.append({"model": model_name, "recipe": candidate.name, "bits": "FP32" if candidate.name == "fp32" else bits,
                     "backend": candidate.backend, "phase": "decode", "metrics": metrics})
    return rows


def decode_env(windows: torch.Tensor | None) -> dict[str, Any]:
    """What the decode rows were measured on, for the results' ``env``."""
    env: dict[str, Any] = {"decode_batch": 1, "decode_cache_tokens": CACHE_TOKENS}
    if windows is not None:
        env["decode_ppl_text"] = (f"{windows.shape[0]} held-out Wikipedia windows of {windows.shape[1]} tokens: "
                                  f"ppl_full in one call each, ppl_incremental through the cache, one token per call")
    return env


def format_decode_row(row: dict[str, Any]) -> str:
    m = row["metrics"]
    quality = "  ".join(f"{k} {m[k]}" for k in ("ppl_full", "ppl_incremental") if k in m)
    return (f"{row['recipe']:24} {row['backend']:11} {m['decode_ms']:9.2f} ms/token (decode)  "
            f"x{m['decode_ratio_vs_fp32']:.3f}  {quality}")
