"""Quantized causal LMs that generate: ``qmodel, report = outlierfx.quantize(model, calibration)``
on a Hugging Face causal LM (:func:`is_causal_lm`) returns a :class:`QuantizedCausalLM`, then
``qmodel.generate(input_ids, max_new_tokens=...)``.

The model is captured once as :class:`~outlierfx.graph.kv_cache.CachedDecoder` (one functional
graph with an explicit static KV cache), so the prompt (prefill) and every decode step run the
same quantized graph: one set of quantization parameters and weights. Calibration is unchanged
(prompt-shaped batches, each from an empty cache of its own length). The model owns every cache
it passes and never reads an old one again, so it runs an FX graph with its cache writes in place
(:meth:`QuantizedCausalLM.cache_writer`): a step writes its tokens' columns instead of copying
every cache.

First-token grids (``+sink`` recipes) follow each text's first real token, in every form: the
graph computes which of a call's tokens they are from its ``attention_mask`` and
``cache_position`` (:mod:`outlierfx.graph.first_tokens`). The prefill puts each prompt's first
token on the first-token grid wherever left padding puts it, and a decode step's new token,
later in its text, is on the main grid: each step runs the new token alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.fx

from .errors import DataError
from .evaluate import DecoderEval
from .graph.kv_cache import cache_inputs, empty_cache, in_place_cache_writes
from .quantizers.observers import FakeQuantize
from .stack_headroom import call_with_stack_headroom


class CausalLMLogits(NamedTuple):
    """What :meth:`QuantizedCausalLM.forward` returns: read ``.logits`` as from a transformers model."""

    logits: torch.Tensor  # [batch, tokens, vocab]


class QuantizedCausalLM(torch.nn.Module):
    """A quantized decoder with a KV cache: ``forward`` gives full-sequence logits,
    :meth:`generate` continues prompts like transformers' ``generate``.

    ``graph`` is the quantized :class:`~outlierfx.graph.kv_cache.CachedDecoder` graph (fake quant
    or lowered); ``first_token_rows`` the number of leading positions on a first-token grid (0:
    none); ``tokenizer`` the model's own, kept alongside where known; ``cache_dtype`` the KV
    cache's dtype (float32, as the quantized graphs compute; float64 for a graph converted with
    ``.double()``)."""

    def __init__(self, graph: torch.nn.Module, config: Any, first_token_rows: int = 0, tokenizer: Any = None,
                 cache_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.graph = graph
        self._in_place: tuple[torch.nn.Module, torch.nn.Module] | None = None  # (graph, its in-place form)
        self.config = config
        self.first_token_rows = first_token_rows
        self.tokenizer = tokenizer
        self.cache_dtype = cache_dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> CausalLMLogits:
        """The logits of whole sequences (teacher forced, from an empty cache), as ``.logits``."""
        with torch.no_grad():
            inputs = cache_inputs(self.config, input_ids, attention_mask, dtype=self.cache_dtype)
            return CausalLMLogits(call_with_stack_headroom(self.cache_writer(), **inputs)[0])

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                 streamer: Any = None) -> torch.Tensor:
        """The prompts followed by up to ``max_new_tokens`` new tokens, ``[batch, tokens + new]``.

        As transformers' ``generate``: greedy by default, sampling with ``do_sample`` (after
        ``temperature``, ``top_k`` and ``top_p``; seed with ``torch.manual_seed``); a batch of
        prompts left-padded, with their ``attention_mask``; a text that produced an
        ``eos_token_id`` (default: the config's) continues with ``pad_token_id`` and generation
        stops once every text has; a ``streamer`` (e.g. ``transformers.TextStreamer``) gets the
        prompt, then each new token."""
        if input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
            raise DataError(f"input_ids must be integer token ids [batch, tokens], got {tuple(input_ids.shape)} "
                            f"{str(input_ids.dtype).removeprefix('torch.')}; pass tokenizer(texts, "
                            f"return_tensors='pt').input_ids")
        if input_ids.shape[1] == 0:
            raise DataError("the prompt is empty; give at least one token (e.g. the tokenizer's bos_token_id)")
        if max_new_tokens < 1:
            raise DataError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
            raise DataError("the prompts are right-padded (a row's last token is padding); generation continues from "
                            "each row's last token: left-pad them (tokenizer.padding_side = 'left')")
        batch, prompt = input_ids.shape
        length = prompt + max_new_tokens
        eos = _token_set(eos_token_id if eos_token_id is not None else getattr(self.config, "eos_token_id", None))
        pad = pad_token_id if pad_token_id is not None else getattr(self.config, "pad_token_id", None)
        if pad is None:
            pad = min(eos) if eos else 0
        tokens = torch.full((batch, length), pad, dtype=torch.long)
        tokens[:, :prompt] = input_ids
        filled = torch.zeros(batch, length, dtype=torch.long)
        filled[:, :prompt] = 1 if attention_mask is None else attention_mask
        finished = torch.zeros(batch, dtype=torch.bool)
        if streamer is not None:
            streamer.put(input_ids)
        with torch.no_grad():
            for column, scores in enumerate(self.next_token_scores(tokens, filled, prompt), start=prompt):
                chosen = next_token(scores, do_sample, temperature, top_k, top_p)
                chosen = torch.where(finished, torch.full_like(chosen, pad), chosen)
                tokens[:, column] = chosen
                filled[:, column] = 1
                if streamer is not None:
                    streamer.put(chosen)
                finished |= torch.tensor([int(t) in eos for t in chosen], dtype=torch.bool)
                if bool(finished.all()):
                    length = column + 1
                    break
        if streamer is not None:
            streamer.end()
        return tokens[:, :length]

    def next_token_scores(self, tokens: torch.Tensor, filled: torch.Tensor, prompt: int) -> Iterator[torch.Tensor]:
        """Runs the first ``prompt`` columns of ``tokens`` ``[batch, columns]`` (prefill), then
        one decode step per later column, through a cache of ``columns`` columns; yields the
        scores ``[batch, vocab]`` that predict each column from ``prompt`` on, before the step
        that reads it: the caller may write ``tokens[:, column]`` (and ``filled``, which columns
        hold real tokens) in between, as :meth:`generate` does."""
        keys, values = empty_cache(self.config, tokens.shape[0], tokens.shape[1], self.cache_dtype)
        rows = list(range(prompt))
        for column in range(prompt, tokens.shape[1]):
            scores, keys, values = self.run_rows(tokens, filled, rows, column - 1, keys, values)
            yield scores
            rows = [column]

    def run_rows(self, tokens: torch.Tensor, filled: torch.Tensor, rows: list[int], newest: int,
                 keys: list[torch.Tensor], values: list[torch.Tensor]
                 ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """One call of the graph: the cache columns ``rows`` of ``tokens``, of which ``newest``
        is the last real column written so far (later columns are not attended to). Returns
        the scores that predict column ``newest + 1`` ``[batch, vocab]`` and the updated caches:
        ``keys`` and ``values`` themselves, written in place, where the graph is an FX graph
        (:meth:`cache_writer`)."""
        written = filled.clone()
        written[:, newest + 1:] = 0
        # From a frame with a data-stack chunk of its own: a decode step is hundreds of short
        # Python calls, which from some caller depths each mapped a chunk (1.5-2x slower steps).
        logits, keys, values = call_with_stack_headroom(
            self.cache_writer(), input_ids=tokens[:, rows], attention_mask=written,
            cache_position=torch.tensor(rows), keys=keys, values=values)
        return logits[:, rows.index(newest)], keys, values

    def cache_writer(self) -> torch.nn.Module:
        """What runs the graph: for an FX graph (fake quant, eager engines), its copy with in-place
        cache writes (:func:`~outlierfx.graph.kv_cache.in_place_cache_writes`; sharing its
        weights), made once per graph, since this model owns every cache it passes and never
        reads an old one again; else (inductor) the graph itself, which copies the caches."""
        if not isinstance(self.graph, torch.fx.GraphModule):
            return self.graph
        if self._in_place is None or self._in_place[0] is not self.graph:
            self._in_place = (self.graph, in_place_cache_writes(self.graph))
        return self._in_place[1]

    def incremental_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                           ) -> CausalLMLogits:
        """The logits of whole sequences as :meth:`forward` gives them, computed through the
        cache: the first token as a prefill, then one decode step per later token (teacher
        forced). What generation computes, token by token; ``forward`` in one call."""
        batch, length = input_ids.shape
        tokens = torch.cat([input_ids, torch.zeros(batch, 1, dtype=input_ids.dtype)], 1)  # scores past the end
        filled = torch.ones(batch, length + 1, dtype=torch.long)
        if attention_mask is not None:
            filled[:, :length] = attention_mask
        with torch.no_grad():
            return CausalLMLogits(torch.stack(list(self.next_token_scores(tokens, filled, 1)), 1))


def next_token(logits: torch.Tensor, do_sample: bool, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None) -> torch.Tensor:
    """The next token of each row of ``logits`` ``[batch, vocab]``: the argmax, or a sample from
    the softmax of ``logits / temperature`` restricted to the ``top_k`` most likely tokens and to
    the smallest set whose probability reaches ``top_p``."""
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise DataError(f"temperature must be > 0 when sampling, got {temperature}; use do_sample=False for greedy")
    scores = logits.float() / temperature
    if top_k is not None and 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = scores.sort(dim=-1, descending=True)
        before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)  # mass of the more likely tokens
        drop = (before >= top_p).scatter(-1, order, before >= top_p)
        scores = scores.masked_fill(drop, float("-inf"))
    return torch.multinomial(scores.softmax(-1), 1).squeeze(-1)


def incremental_perplexity(lm: QuantizedCausalLM, windows: torch.Tensor) -> float:
    """The perplexity of ``lm`` on ``windows`` ``[count, tokens]`` scored through its cache (one
    window at a time, the first token as a prefill, then one decode step per token): what
    :meth:`~outlierfx.evaluate.DecoderEval.perplexity` gives from the full-sequence logits, up to
    float rounding."""
    return DecoderEval.perplexity(lm.incremental_logits, windows, batch=1)


def _token_set(ids: int | Sequence[int] | None) -> frozenset[int]:
    if ids is None:
        return frozenset()
    return frozenset([int(ids)] if isinstance(ids, int) else (int(i) for i in ids))


def first_token_rows(graph: torch.nn.Module) -> int:
    """The number of leading positions any quantizer of a fake-quant ``graph`` keeps on a grid of
    their own (0: none)."""
    return max((m.spec.sink_tokens for m in graph.modules() if isinstance(m, FakeQuantize) and m.has_sink_grid),
               default=0)


def is_causal_lm(model: torch.nn.Module) -> bool:
    """Whether :func:`~outlierfx.quantize` gives ``model`` back as a :class:`QuantizedCausalLM`:
    a Hugging Face model that generates (``can_generate()``: a ``GenerationMixin`` model such as
    ``AutoModelForCausalLM``'s) and returns next-token logits (output embeddings), and is not an
    encoder-decoder. Encoders (BERT, MiniLM) and bare decoders without a head (``LlamaModel``)
    are not."""
    config = getattr(model, "config", None)
    can_generate = getattr(model, "can_generate", None)
    get_head = getattr(model, "get_output_embeddings", None)
    return (config is not None and callable(can_generate) and bool(can_generate()) and callable(get_head)
            and get_head() is not None and not getattr(config, "is_encoder_decoder", False))
