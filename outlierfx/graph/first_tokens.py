"""Which tokens of a call are each text's first tokens: the rows ``+sink`` quantizers put on a
grid of their own (``QuantSpec.sink_tokens``; attention-sink activations sit on them).

A text's first real token is the first position its ``attention_mask`` marks real. In a
left-padded batch (how prompts of different lengths are batched for generation) that is not
column 0: counting positions from the start of the call put a padding column on the first-token
grid and the text's first token on the main grid. Every form with first-token grids takes its
rows from :func:`first_token_mask` (the fake-quant graph computes it once from its inputs,
:func:`wire_first_tokens`; observers from the calibration batch's mask), so right-padded and
unpadded batches keep columns ``0..n-1`` and a decode step behind a filled cache has none.
"""

from __future__ import annotations

import torch
import torch.fx

from . import meta
from .kv_cache import positions_in_text

ATTENTION_MASK, CACHE_POSITION = "attention_mask", "cache_position"
"""The graph inputs that say which tokens are real (a tokenizer's names; :mod:`.kv_cache`'s)."""


def first_token_mask(attention_mask: torch.Tensor, cache_position: torch.Tensor | None, n: int) -> torch.Tensor:
    """``[batch, tokens]`` bool: whether each token of the call is among its text's first ``n``
    real tokens. ``attention_mask`` is ``[batch, tokens]``, or, with ``cache_position``
    (``[tokens]``, the cache column of each token), the cache's ``[batch, max_cache_len]``:
    a decode step's token sits at a later position of its text, so it is not a first token."""
    real, position = attention_mask != 0, positions_in_text(attention_mask)
    if cache_position is not None:
        real, position = real.index_select(1, cache_position), position.index_select(1, cache_position)
    return real & (position < n)


def leading_columns(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[batch, tokens]`` bool: the first ``n`` columns of ``x`` ``[batch, tokens, ...]`` when it
    has more than ``n``, else none: the first tokens of a graph called without an attention mask
    (nothing says where its texts start), and a short call there is a decode step's."""
    columns = torch.arange(x.shape[1], device=x.device)
    leading = columns < (n if x.shape[1] > n else 0)
    return leading.expand(x.shape[0], -1)


def rows_of(first: torch.Tensor | None, x: torch.Tensor, n: int) -> torch.Tensor:
    """The first-token mask for ``x`` ``[batch, tokens, ...]``: ``first`` (from
    :func:`first_token_mask`) where it lines up with ``x``'s first two axes, else
    :func:`leading_columns` (a tensor whose axis 1 is not its tokens keeps that rule)."""
    if first is not None and tuple(first.shape) == tuple(x.shape[:2]):
        return first
    return leading_columns(x, n)


def on_first_rows(first: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``first`` ``[batch, tokens]`` broadcast over ``x``'s trailing axes, for ``torch.where``."""
    return first.reshape(*first.shape, *([1] * (x.dim() - 2)))


def first_token_columns(first: torch.Tensor, n: int) -> torch.Tensor:
    """``[batch, n]`` long from a first-token mask ``[batch, seq]``: the column of each text's
    k-th first token in the call (0 where it has none, e.g. in a decode step: those rows are
    computed and never read). Static shapes for a compiled graph's ``batch x n`` first rows."""
    rank = first.long().cumsum(1) - 1
    k = torch.arange(n, device=first.device)
    hit = first[:, None, :] & (rank[:, None, :] == k[None, :, None])  # [batch, n, seq]
    return hit.int().argmax(-1)


def _row_index(index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` ``[batch, seq, ...]``'s rows at ``index`` ``[batch, n]`` (:func:`first_token_columns`)."""
    return x.gather(1, _row_index(index, x))


def scatter_rows(x: torch.Tensor, rows: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """``x`` with its first-token rows (``first`` ``[batch, seq]``) taken from ``rows``
    ``[batch, n, ...]`` (:func:`gather_rows`' order); each column reads its rank among its
    text's first tokens, so no two rows write one place."""
    n = rows.shape[1]
    rank = (first.long().cumsum(1) - 1).clamp(0, n - 1)
    back = rows.gather(1, _row_index(rank, x))
    return torch.where(on_first_rows(first, x), back, x)


def wire_first_tokens(gm: torch.fx.GraphModule, readers: list[tuple[torch.fx.Node, int]], created_by: str) -> bool:
    """Give each ``(node, n)`` in ``readers`` (a call_module quantizer reading its tensor as
    ``args[0]``) the graph's :func:`first_token_mask` for ``n`` as ``args[1]``, computed once per
    ``n`` from the graph's ``attention_mask`` (and ``cache_position``, a cached decoder's).
    False (nothing changed) for a graph without an ``attention_mask`` input: its quantizers
    keep :func:`leading_columns`."""
    readers = [(node, n) for node, n in readers if len(node.args) == 1]
    if not readers or first_token_mask_node(gm, readers[0][1], created_by) is None:
        return False
    for node, n in readers:
        node.args = (node.args[0], first_token_mask_node(gm, n, created_by))
    return True


def first_token_mask_node(gm: torch.fx.GraphModule, n: int, created_by: str) -> torch.fx.Node | None:
    """The node computing the graph's :func:`first_token_mask` for ``n`` from its
    ``attention_mask`` (and ``cache_position``) inputs: the one already there, else a new one
    right after the inputs; None in a graph without an ``attention_mask`` input."""
    placeholders = {str(node.target): node for node in gm.graph.nodes if node.op == "placeholder"}
    mask = placeholders.get(ATTENTION_MASK)
    if mask is None:
        return None
    found = next((node for node in gm.graph.nodes if node.target is first_token_mask and node.args[2] == n), None)
    if found is not None:
        return found
    with gm.graph.inserting_after(list(placeholders.values())[-1]):
        made = gm.graph.call_function(first_token_mask, (mask, placeholders.get(CACHE_POSITION), n))
    made.meta[meta.CREATED_BY] = created_by
    return made
