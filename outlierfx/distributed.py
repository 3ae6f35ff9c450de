"""Data-parallel calibration on torch.distributed: which batches a rank sees, and how statistics
are merged so that every rank ends with what one process would have on all batches.

Under ``torchrun --nproc-per-node N`` (or any initialized process group with more than one
rank) every rank passes the same calibration list; the passes that only collect statistics
(:func:`outlierfx.quantizers.calibrate.calibrate`, GPTQ's Gram matrices) run each rank on its
:func:`shard` (batch ``i`` goes to rank ``i % world``) and then merge with
:func:`reduce_statistics`. A class that holds statistics declares how each merges
(``STATISTICS: {attribute: Reduction}``); the merge packs the attributes of one kind into a few
flat tensors, so a whole model's observers cost a handful of collectives. Without a process
group (or with one rank) every function here is the identity: single-process runs do not change.

Passes that train (Quadapter scales, learned ranges, QAT) train data-parallel through one shared
step (:mod:`outlierfx.passes.training`): each rank backpropagates its own batches, the gradients
and the loss are summed in one flat all_reduce per step (:func:`sum_across_ranks`) and averaged
over the step's batches, and every rank takes the same optimizer step; the losses that decide
(early stopping, the best snapshot) are summed across ranks too, so every rank decides the same.
The trained values are then taken from rank 0 (:func:`broadcast_from_main`), so ranks on
different CPUs cannot drift apart. Token-wise clipping searches its grid on the merged per-token
extremes (the same search on every rank).

torch.distributed is the transport; the process group must carry CPU tensors (gloo, or a
``cpu:gloo,cuda:nccl`` group).
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist

from .errors import DistributedError

T = TypeVar("T")


class Reduction(enum.Enum):
    """How one statistic merges across ranks."""

    MIN = "min"  # elementwise minimum (all_reduce MIN): exact
    MAX = "max"  # elementwise maximum: exact
    SUM = "sum"  # elementwise sum (token counts exact; float sums in another order)
    CONCAT = "concat"  # the ranks' rows along axis 0, rank 0's first (all_gather)


class HoldsStatistics(Protocol):
    """A module (an observer, a Gram recorder) whose attributes named in ``STATISTICS`` are
    tensors, or ``None``/empty where this rank saw nothing."""

    STATISTICS: Mapping[str, Reduction]


def active() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process prints, shows progress and writes files (rank 0, or no process group)."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher setting ``WORLD_SIZE``) started several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_environment() -> bool:
    """Join the process group torchrun describes (gloo: the statistics are CPU tensors); True
    when this call created it (the caller then ends it with :func:`shutdown`)."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    dist.init_process_group("gloo")
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def describe() -> str:
    """One line for the report: how the run was split."""
    n = world_size()
    return (f"calibrated data-parallel on {n} processes (torch.distributed, {dist.get_backend()}): rank r took "
            f"batches r, r+{n}, ...; observer statistics (and GPTQ's Gram matrices) were reduced across ranks; trained "
            f"stages took ceil(steps / {n}) steps, each on the gradient averaged over one batch per rank")


def shard(batches: Sequence[T]) -> list[T]:
    """This rank's batches: ``batches[rank::world]`` (all of them without a process group).
    Refuses ranks that were given different calibration lists, and more ranks than batches."""
    if not active():
        return list(batches)
    n = world_size()
    if len(batches) < n:
        raise DistributedError(f"{len(batches)} calibration batches for {n} processes: every rank needs at least "
                               f"one; pass more (smaller) batches or run fewer processes")
    fingerprints: list[Any] = [None] * n
    dist.all_gather_object(fingerprints, _fingerprint(batches))
    if any(f != fingerprints[0] for f in fingerprints):
        raise DistributedError("the ranks were given different calibration batches; every rank must pass the same "
                               "list (outlierfx gives rank r the batches r, r+world, ...)")
    return list(batches[rank()::n])


def _fingerprint(batches: Sequence[Any]) -> tuple:
    """Shapes and digests of a calibration list's tensors (their bytes: NaN equals NaN here)."""
    def of(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            return tuple(value.shape), str(value.dtype), hashlib.blake2b(data, digest_size=16).hexdigest()
        if isinstance(value, Mapping):
            return tuple((k, of(v)) for k, v in sorted(value.items()))
        if isinstance(value, (tuple, list)):
            return tuple(of(v) for v in value)
        return repr(value)

    return len(batches), tuple(of(b) for b in batches)


@contextlib.contextmanager
def failing_together(what: str) -> Iterator[None]:
    """Run this rank's share of ``what``; where any rank fails, every rank raises (the failing
    one its own error, the others a :class:`DistributedError` with its message) instead of
    waiting in the next collective for a rank that is gone."""
    error: BaseException | None = None
    try:
        yield
    except Exception as exc:  # re-raised below, once every rank knows
        error = exc
    if active():
        messages: list[Any] = [None] * world_size()
        dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        if failed and error is None:
            raise DistributedError(f"rank {failed[0][0]} failed while {what}: {failed[0][1]}")
    if error is not None:
        raise error


def reduce_statistics(holders: Iterable[HoldsStatistics]) -> None:
    """Merge every holder's ``STATISTICS`` across ranks, in place: each rank ends with the
    statistics of all ranks' batches. A rank that saw nothing for a statistic (``None`` or an
    empty tensor) contributes nothing to it. The identity without a process group."""
    if not active():
        return
    holders = list(holders)
    slots = [(h, name, how) for h in holders for name, how in type(h).STATISTICS.items()]
    local = [_shape_of(getattr(h, name)) for h, name, _ in slots]
    everyone: list[Any] = [None] * world_size()
    dist.all_gather_object(everyone, local)  # shapes and dtypes: small, and it lets any rank be empty
    merged: dict[int, torch.Tensor] = {}
    for how in Reduction:
        indices = [i for i, (_, _, h) in enumerate(slots) if h is how]
        for dtype in sorted({everyone[r][i][1] for i in indices for r in range(len(everyone))
                             if everyone[r][i] is not None}, key=str):
            group = [i for i in indices if any(e[i] is not None and e[i][1] == dtype for e in everyone)]
            merge = _concat if how is Reduction.CONCAT else _elementwise
            merged.update(merge(how, [getattr(slots[i][0], slots[i][1]) for i in group], group, everyone,
                                getattr(torch, dtype)))
    for i, (holder, name, _) in enumerate(slots):
        if i in merged:
            setattr(holder, name, merged[i])


def _shape_of(value: torch.Tensor | None) -> tuple[tuple[int, ...], str] | None:
    if value is None or value.numel() == 0:
        return None
    return tuple(value.shape), str(value.dtype).removeprefix("torch.")


_IDENTITY = {Reduction.MIN: float("inf"), Reduction.MAX: float("-inf"), Reduction.SUM: 0}
_OPS = {Reduction.MIN: dist.ReduceOp.MIN, Reduction.MAX: dist.ReduceOp.MAX, Reduction.SUM: dist.ReduceOp.SUM}


# Statistics are packed into flat tensors of at most this many elements per all_reduce (a larger
# statistic goes alone): thousands of small observer ranges cost one collective, while the packed
# copy of GPTQ's Gram matrices (150 MB on MiniLM, 1 GB on SmolLM2) stays one chunk at a time.
PACK_ELEMENTS = 1 << 23


def _elementwise(how: Reduction, values: list[torch.Tensor | None], slots: list[int], everyone: list[Any],
                 dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """All_reduce every statistic of this kind, packed into flat chunks; a rank without a value
    puts the reduction's identity in its place."""
    shapes = []
    for slot in slots:
        seen = {e[slot][0] for e in everyone if e[slot] is not None}
        if len(seen) != 1:
            raise DistributedError(f"the ranks recorded a statistic with different shapes {sorted(seen)}; were they "
                                   f"given the same model and recipe?")
        shapes.append(seen.pop())
    identity = _IDENTITY[how]
    if identity == float("inf") and not dtype.is_floating_point:
        identity = torch.iinfo(dtype).max
    elif identity == float("-inf") and not dtype.is_floating_point:
        identity = torch.iinfo(dtype).min
    chunks: list[list[int]] = [[]]  # positions in slots, packed up to PACK_ELEMENTS
    size = 0
    for k, shape in enumerate(shapes):
        if chunks[-1] and size + _numel(shape) > PACK_ELEMENTS:
            chunks.append([])
            size = 0
        chunks[-1].append(k)
        size += _numel(shape)
    out: dict[int, torch.Tensor] = {}
    for chunk in filter(None, chunks):
        flat = torch.cat([values[j].reshape(-1).to(dtype) if values[j] is not None and values[j].numel() else
                          torch.full((_numel(shapes[j]),), identity, dtype=dtype) for j in chunk])
        dist.all_reduce(flat, op=_OPS[how])
        start = 0
        for j in chunk:
            out[slots[j]] = flat[start:start + _numel(shapes[j])].reshape(shapes[j]).clone()
            start += _numel(shapes[j])
    return out


def _concat(how: Reduction, values: list[torch.Tensor | None], slots: list[int], everyone: list[Any],
            dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """One all_gather of every statistic of this kind (each rank's rows packed and padded to the
    longest rank's), then each statistic's rows in rank order."""
    rows = [[e[slot][0] if e[slot] is not None else None for slot in slots] for e in everyone]
    sizes = [sum(_numel(s) for s in r if s is not None) for r in rows]
    mine = [v.reshape(-1).to(dtype) for v in values if v is not None and v.numel()]
    flat = torch.cat(mine) if mine else torch.empty(0, dtype=dtype)
    padded = torch.cat([flat, torch.zeros(max(sizes) - flat.numel(), dtype=dtype)])
    gathered = [torch.empty_like(padded) for _ in everyone]
    dist.all_gather(gathered, padded)
    pieces: list[list[torch.Tensor]] = [[] for _ in slots]
    for shapes, data in zip(rows, gathered):
        start = 0
        for k, shape in enumerate(shapes):
            if shape is not None:
                pieces[k].append(data[start:start + _numel(shape)].reshape(shape))
                start += _numel(shape)
    return {slot: torch.cat(p) for slot, p in zip(slots, pieces)}


def _numel(shape: tuple[int, ...]) -> int:
    return int(torch.Size(shape).numel())


def broadcast_from_main(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite ``tensors`` in place with rank 0's values (a trained stage's values: every rank
    took the same steps, and this keeps ranks on different CPUs from drifting apart). The
    identity without a process group."""
    if not active():
        return
    with torch.no_grad():
        for tensor in tensors:
            if tensor.numel():
                dist.broadcast(tensor, src=0)


def sum_across_ranks(tensors: Sequence[torch.Tensor], numbers: Sequence[float] = ()) -> list[float]:
    """Add ``tensors`` (in place) and ``numbers`` over the ranks in ONE all_reduce, packed into a
    float64 vector (a data-parallel training step's gradients and loss: one collective per step,
    and the summed losses every rank's decisions read are the same bits everywhere). Returns the
    summed numbers; the identity without a process group."""
    if not active():
        return list(numbers)
    flat = torch.cat([*(t.detach().reshape(-1).double() for t in tensors), torch.tensor(list(numbers),
                                                                                      dtype=torch.float64)])
    dist.all_reduce(flat)
    start = 0
    with torch.no_grad():
        for tensor in tensors:
            tensor.copy_(flat[start:start + tensor.numel()].view_as(tensor))
            start += tensor.numel()
    return flat[start:].tolist()
