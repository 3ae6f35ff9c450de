"""A Hugging Face causal LM as one functional graph with a static KV cache.

:class:`CachedDecoder` wraps the model so that the cache is explicit: it takes the new tokens,
the cache columns they go to, which columns hold real tokens, and every layer's key and value
cache (fixed length ``max_cache_len``), and returns the logits and the updated caches. Nothing is
mutated, so the captured graph is a normal FX graph every pass understands, and one graph serves
the prompt (prefill: all its tokens at once, from column 0) and each decode step (the new
token): both share one set of quantization parameters and weights by construction.

The graph's inputs (:func:`cache_inputs` builds them for whole sequences from an empty cache):

- ``input_ids`` ``[batch, tokens]``;
- ``attention_mask`` ``[batch, max_cache_len]``: which cache columns hold real tokens once this
  call's tokens are written (left padding and columns not yet written: 0). The attention bias
  (:func:`attention_bias`) and each token's position in its own text (:func:`positions_in_text`,
  for the rotary embedding) are computed from it inside the graph;
- ``cache_position`` ``[tokens]``: the cache column each token's keys and values are written to;
- ``keys`` and ``values``: one ``[batch, kv_heads, max_cache_len, head_dim]`` tensor per layer.

For a prompt-shaped batch ``max_cache_len`` is its length, so ``attention_mask`` is the
tokenizer's: calibration batches keep their padding mask for the observers.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx

from ..errors import DataError

aten = torch.ops.aten
IN_PLACE_SOURCE = "source"
"""The submodule of :func:`in_place_cache_writes`' graph that is the functional graph it reads."""


class FunctionalStaticCache:
    """The cache object a Hugging Face attention layer updates, without mutation.

    ``update`` writes the layer's new keys and values at ``cache_position`` into copies of its
    cache tensors (``index_copy``, not ``index_copy_``: the captured graph stays functional) and
    returns them for attention; the wrapper returns the copies as the new cache."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], cache_position: torch.Tensor) -> None:
        self.keys, self.values, self.cache_position = list(keys), list(values), cache_position

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer_idx] = self.keys[layer_idx].index_copy(2, self.cache_position, key_states)
        self.values[layer_idx] = self.values[layer_idx].index_copy(2, self.cache_position, value_states)
        return self.keys[layer_idx], self.values[layer_idx]


class CachedDecoder(torch.nn.Module):
    """``model`` (a Hugging Face causal LM) called with an explicit static cache:
    ``(logits, keys, values) = CachedDecoder(model)(input_ids, attention_mask, cache_position,
    keys, values)``. The model is held, not copied or changed.

    ``attention_mask`` is ``[batch, max_cache_len]``: which cache columns hold real tokens once
    this call's tokens are written (left padding: 0). The attention bias and each token's
    position in its own text (for the rotary embedding) are computed from it inside the graph,
    as transformers' ``generate`` computes them."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = getattr(model, "config", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache_position: torch.Tensor,
                keys: list[torch.Tensor], values: list[torch.Tensor]
                ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        cache = FunctionalStaticCache(keys, values, cache_position)
        dtype = keys[0].dtype
        position_ids = positions_in_text(attention_mask).index_select(1, cache_position)
        out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=True, cache=cache,
                         attention_mask=attention_bias(attention_mask, cache_position, dtype))
        return out["logits"], cache.keys, cache.values


def cache_shape(config: Any, batch: int, max_cache_len: int) -> tuple[tuple[int, int, int, int], int]:
    """``([batch, kv_heads, max_cache_len, head_dim], layers)`` for a Hugging Face decoder config."""
    try:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        layers = config.num_hidden_layers
    except AttributeError as exc:
        raise DataError(f"cannot size a KV cache from this config ({type(config).__name__} has no {exc.name}); "
                        f"a KV cache needs a Hugging Face decoder config (num_attention_heads, hidden_size, "
                        f"num_hidden_layers)") from exc
    return (batch, kv_heads, max_cache_len, head_dim), layers


def empty_cache(config: Any, batch: int, max_cache_len: int, dtype: torch.dtype = torch.float32
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Zeroed key and value caches, one per layer."""
    shape, layers = cache_shape(config, batch, max_cache_len)
    return [torch.zeros(shape, dtype=dtype) for _ in range(layers)], [torch.zeros(shape, dtype=dtype)
                                                                       for _ in range(layers)]


def attention_bias(filled: torch.Tensor, cache_position: torch.Tensor, dtype: torch.dtype = torch.float32
                   ) -> torch.Tensor:
    """``[batch, 1, tokens, max_cache_len]``: 0 where token ``t`` may attend to column ``j``
    (``filled[b, j]``, a real token, and ``j <= cache_position[t]``), the dtype's minimum elsewhere
    (not -inf: a padding row that may attend to nothing then gets a uniform softmax, as in
    transformers, instead of NaN). ``filled`` is ``[batch, max_cache_len]``: which columns hold
    real tokens once this step is written."""
    columns = torch.arange(filled.shape[1], device=filled.device)
    allowed = filled.bool()[:, None, None, :] & (columns[None, :] <= cache_position[:, None])[None, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=filled.device).masked_fill(~allowed, torch.finfo(dtype).min)


def positions_in_text(filled: torch.Tensor) -> torch.Tensor:
    """Each cache column's position in its own text: real tokens count from 0 after any left
    padding (as transformers' ``generate`` numbers them); padding columns get 0."""
    return (filled.long().cumsum(-1) - 1).clamp(min=0)


def cache_inputs(config: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_cache_len: int | None = None, dtype: torch.dtype = torch.float32,
                 caches: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] | None = None) -> dict[str, Any]:
    """The graph's inputs for whole sequences from an empty cache (a prefill, a calibration batch,
    a full-sequence forward): tokens at columns ``0..tokens-1`` of a cache of ``max_cache_len``
    columns (default: just the tokens) in ``dtype``. With ``caches`` (shape -> empty caches, filled
    as needed) inputs of one shape share their empty caches (see :func:`prefill_batches`)."""
    batch, tokens = input_ids.shape
    length = tokens if max_cache_len is None else max_cache_len
    if tokens > length:
        raise DataError(f"{tokens} tokens do not fit a KV cache of {length}; pass a larger max_cache_len "
                        f"or shorter inputs")
    filled = torch.zeros(batch, length, dtype=torch.long)
    filled[:, :tokens] = 1 if attention_mask is None else attention_mask
    shape = (batch, length, dtype)
    keys, values = empty_cache(config, batch, length, dtype) if caches is None or shape not in caches else caches[shape]
    if caches is not None:
        caches[shape] = keys, values
    return {"input_ids": input_ids, "attention_mask": filled, "cache_position": torch.arange(tokens),
            "keys": keys, "values": values}


def prefill_batches(config: Any, batches: Iterable[Any]) -> list[dict[str, Any]]:
    """Prompt-shaped batches as the graph's inputs (:func:`prefill_inputs`), those of one shape
    sharing one set of empty caches: the graph never writes into its inputs (it writes a batch's
    keys and values into copies, ``index_copy``), so an empty cache stays empty, and a calibration
    set held in this form costs one empty cache per shape, not one per batch (SmolLM2's 8 x 128
    batches: 47 MB each; docs/experiments/memory.md, section 5)."""
    caches: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    return [prefill_inputs(config, batch, caches) for batch in batches]


def prefill_inputs(config: Any, batch: Any,
                   caches: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] | None = None) -> dict[str, Any]:
    """A prompt-shaped batch (a tokenizer's ``input_ids`` and ``attention_mask``) as the graph's
    inputs from an empty cache of its own length: how calibration batches reach the graph
    (``caches``: as :func:`cache_inputs` takes them)."""
    if not isinstance(batch, dict) or "input_ids" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"a decoder's batches need input_ids (got {keys}) to quantize it for generation; pass the "
                        f"tokenizer's output, or quantize(..., generation=False) for its one-pass forward")
    return cache_inputs(config, batch["input_ids"], batch.get("attention_mask"), caches=caches)


def in_place_cache_writes(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` (a captured :class:`CachedDecoder` graph, fake quant or lowered) with its cache
    writes in place: each ``index_copy`` into a graph input that nothing else reads (but for its
    shape) becomes ``index_copy_``, so a call writes its tokens' columns into the caches it is
    given and returns those same tensors, instead of copying every cache on every call.

    For a caller that owns the caches and never reads the old ones again (what
    :class:`~outlierfx.generation.QuantizedCausalLM` does); the functional graph stays what
    passes, checks, saving and exporting see. The result holds ``gm`` as its one submodule
    (``IN_PLACE_SOURCE``) and reads every parameter, buffer and module through it at run time,
    so it copies no tensor and follows ``gm`` through ``.to()``/``.double()``; ``gm`` is not
    changed."""
    graph = copy.deepcopy(gm.graph)
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            node.target = f"{IN_PLACE_SOURCE}.{node.target}"
        cache = node.args[0] if node.op == "call_function" and node.target is aten.index_copy.default else None
        if isinstance(cache, torch.fx.Node) and cache.op == "placeholder" \
                and all(user is node or user.target is aten.sym_size.int for user in cache.users):
            node.target = aten.index_copy_.default
    graph.lint()
    holder = torch.nn.Module()
    holder.add_module(IN_PLACE_SOURCE, gm)
    in_place = torch.fx.GraphModule(holder, graph, class_name=type(gm).__name__)
    in_place.add_module(IN_PLACE_SOURCE, gm)  # GraphModule copied gm's attributes into a new module: read gm's own
    return in_place
