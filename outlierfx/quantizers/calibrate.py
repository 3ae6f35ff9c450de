"""Calibration: run batches through a graph with observers, with checks that name the problem."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.fx

from .. import distributed
from ..errors import DataError
from ..graph import meta
from ..graph.block_order import run_in_block_order
from ..graph.ops import OpKind, op_kind
from .observers import Observer, check_mergeable, merge_across_ranks, token_mask


def _check_batch(i: int, batch: Any, example: tuple[tuple, dict] | None) -> dict[str, torch.Tensor]:
    if not isinstance(batch, Mapping):
        raise DataError(f"calibration batch {i} is a {type(batch).__name__}; expected a dict of input tensors")
    if example is not None:
        expected = example[1]
        if set(batch) != set(expected):
            raise DataError(f"calibration batch {i} has inputs {sorted(batch)}, the graph takes {sorted(expected)}")
        for key, ref in expected.items():
            value = batch[key]
            if isinstance(ref, torch.Tensor):
                if not isinstance(value, torch.Tensor) or value.dim() != ref.dim() or value.dtype != ref.dtype:
                    got = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
                    raise DataError(f"calibration batch {i} input {key!r} is {got}; the graph was captured "
                                    f"with {tuple(ref.shape)} {ref.dtype} (same rank and dtype required)")
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dtype.is_floating_point and not torch.isfinite(value).all():
            raise DataError(f"calibration batch {i} input {key!r} contains NaN or inf")
    return dict(batch)


def _no_observers_message(gm: torch.fx.GraphModule) -> str:
    """Why there is nothing to calibrate: a graph in which outlierfx recognised no Linear is not
    the user's mistake, and the message must not say it is."""
    if not any(op_kind(n) is OpKind.LINEAR for n in gm.graph.nodes):
        return ("the graph has no observers because outlierfx recognised no Linear layer in it (it recognises "
                "nn.Linear, GPT-2's Conv1D and `x @ W.T + b` with a stored weight, after capture); a model without "
                "Linear layers has nothing for int8 GEMMs to run. If this model's Linears are written another way, "
                "that is a gap in outlierfx's canonicalization: please report the architecture")
    return "the graph has no observers; run InsertObservers (or a recipe) on it first"


def calibrate(gm: torch.fx.GraphModule, batches: Iterable[Mapping[str, torch.Tensor]], progress: bool = True) -> float:
    """Feed ``batches`` (dicts of keyword inputs) through ``gm``; its observers record ranges.

    Padding (``attention_mask == 0``) is excluded from the statistics. Returns the seconds spent.
    Raises :class:`DataError` for an empty set, inputs that do not match the captured ones,
    and NaN/inf in inputs or activations.

    A graph captured without weights (:func:`~outlierfx.graph.weight_source.capture_without_weights`)
    is calibrated in block order (:func:`~outlierfx.graph.block_order.run_in_block_order`): the
    batches go through one block after the other, each block's weights loaded from the
    checkpoint only while its nodes run, and only the nodes the observers read are computed (no
    logits); each observer sees what a whole-graph run shows it, in the same batch order.

    Under torch.distributed every rank passes the same ``batches``, runs its shard of them
    (batch ``i`` on rank ``i % world``) and ends with the statistics of all of them
    (:func:`outlierfx.quantizers.observers.merge_across_ranks`); progress shows on rank 0 only.
    """
    observers = [m for m in gm.modules() if isinstance(m, Observer)]
    if not observers:
        raise DataError(_no_observers_message(gm))
    batches = list(batches)
    if not batches:
        raise DataError("the calibration set is empty")
    example = gm.meta.get(meta.GM_EXAMPLE_INPUTS)
    check_mergeable(observers)
    ranks = distributed.world_size()
    iterator: Iterable = zip(range(distributed.rank(), len(batches), ranks), distributed.shard(batches))
    in_block_order = gm.meta.get(meta.GM_WEIGHT_SOURCE) is not None  # no weights in memory: a block's at a time
    if progress and distributed.is_main() and not in_block_order:  # block order finishes no batch before the end
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(range(0, len(batches), ranks)), desc="calibrating", unit="batch")
    start = time.perf_counter()
    with torch.no_grad(), distributed.failing_together("calibrating"):
        if in_block_order:
            inputs = [_check_batch(i, batch, example) for i, batch in iterator]
            observed = [n for n in gm.graph.nodes
                        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), Observer)]
            run_in_block_order(gm, inputs, observed, token_mask)
        else:
            for i, batch in iterator:
                inputs = _check_batch(i, batch, example)
                with token_mask(inputs.get("attention_mask")):
                    gm(**inputs)
    merge_across_ranks(observers)
    silent = [o.name for o in observers if not o.calibrated]
    if silent:
        raise DataError(f"{len(silent)} observers saw no real token (e.g. {silent[0]}); are all batches padding?")
    return time.perf_counter() - start
