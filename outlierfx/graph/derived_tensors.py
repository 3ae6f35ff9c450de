"""Tensors a graph captured without weights computes when it loads them: rewritten weights.

A pass that rewrites a weight before calibration (MigrateGamma's ``W diag(gamma)``, a rotation's
``W Q``) cannot compute the new value on a graph that holds no weights, and holding it would
cost the model's float weights again. It records the computation instead: a
:class:`DerivedTensor` names the entries it is computed from (checkpoint keys, held codes, other
derived tensors: a rotation of a migrated weight nests) and the function that computes it.
:func:`~outlierfx.graph.weight_source.materialize` evaluates it when a block loads it
(:func:`evaluate`), from the same function on the same input values that the full-memory path
applies to the loaded weight, so both hold the same tensor bit for bit. The constants of the
rewrite (a gamma factor, a rotation matrix) live in the function's closure, shared by all the
tensors rewritten with them: a few MB, never a weight's copy.

A rewrite may also give the same computation done in place (``compute_in_place``: ``w.mul_(s)``
for ``w * s``, a rotation written back into its input's rows). :func:`evaluate` uses it where
the input is a value nobody else holds (loaded or computed for this evaluation, read by no
other entry, not returned): then a chain of rewrites of a table (SmolLM2's LM head: loaded,
its columns scaled by the final norm's gain, rotated) holds one table, not two.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import torch

from ..errors import PassError


@dataclasses.dataclass(frozen=True, eq=False)  # identity-hashed: targets sharing one entry load one tensor
class DerivedTensor:
    """``compute(*values of inputs)``, a tensor of ``shape`` and ``dtype``, where each input is an
    entry of a :class:`~outlierfx.graph.weight_source.WeightSource` (loaded as that entry loads)."""

    inputs: tuple[Any, ...]
    compute: Callable[..., torch.Tensor] = dataclasses.field(repr=False)
    shape: tuple[int, ...]
    dtype: torch.dtype
    description: str  # what computes it, e.g. "RotateResidual: W Q"
    # the same values as ``compute`` of one input, written into that input and returned
    compute_in_place: Callable[[torch.Tensor], torch.Tensor] | None = dataclasses.field(default=None, repr=False)


def evaluate(roots: Iterable[Hashable], load: Callable[[Any], torch.Tensor]) -> dict[Hashable, torch.Tensor]:
    """The value of each entry of ``roots``: a :class:`DerivedTensor` computed from its inputs'
    values, any other entry by ``load``. An entry several others read (a table a tied head and
    the embedding were both rewritten from) is loaded once, and every intermediate value is
    dropped as soon as its last reader has been computed, so a chain of rewrites holds at most
    one value per link at a time, and one in all where the links compute in place (an input
    no other entry reads and the caller does not get: see the module docstring). ``load``
    returns a tensor of its own at each call (a link may overwrite it)."""
    roots = list(dict.fromkeys(roots))
    returned = set(roots)
    readers: collections.Counter[Hashable] = collections.Counter(roots)  # each root is read once: by the caller
    stack, seen = list(roots), set()
    while stack:
        entry = stack.pop()
        if entry in seen:
            continue
        seen.add(entry)
        if isinstance(entry, DerivedTensor):
            readers.update(entry.inputs)
            stack.extend(entry.inputs)
    kept: dict[Hashable, torch.Tensor] = {}

    def value(entry: Hashable) -> torch.Tensor:
        result = kept[entry] if entry in kept else _computed(entry, value, owned) \
            if isinstance(entry, DerivedTensor) else load(entry)
        readers[entry] -= 1
        if readers[entry]:
            kept[entry] = result
        else:
            kept.pop(entry, None)
        return result

    def owned(entry: Hashable) -> bool:  # read for the last time, and not returned: free to overwrite
        return readers[entry] == 0 and entry not in returned

    return {root: value(root) for root in roots}


def _computed(entry: DerivedTensor, value: Callable[[Hashable], torch.Tensor],
              owned: Callable[[Hashable], bool]) -> torch.Tensor:
    inputs = [value(i) for i in entry.inputs]
    if entry.compute_in_place is not None and len(inputs) == 1 and owned(entry.inputs[0]) \
            and inputs[0].is_contiguous():
        result = entry.compute_in_place(inputs[0])
    else:
        result = entry.compute(*inputs)
    if tuple(result.shape) != entry.shape or result.dtype != entry.dtype:
        raise PassError(f"{entry.description} computed a {result.dtype} tensor of shape {tuple(result.shape)} "
                           f"where the graph holds a {entry.dtype} tensor of shape {entry.shape}: a rewrite "
                           f"recorded for a graph captured without weights must keep its tensor's shape and dtype")
    return result
