"""Observers and fake quantizers as ``nn.Module``s with their state in buffers.

An :class:`Observer` returns its input unchanged and records statistics; :meth:`Observer.qparams`
turns them into scale/zero point. Collection is split (as NNCF does) into a per-batch
*reduction* (which axes: per-tensor, per-channel, per-token) and an *aggregation* across batches
(min/max, running average, samples for percentile/MSE, per-token quantiles).

Padding tokens never enter the statistics: during calibration the attention mask is published
with :func:`token_mask`, and observers keep only real tokens of ``[batch, seq, ...]`` tensors and
real query/key pairs of ``[batch, heads, seq, seq]`` attention tensors.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import ClassVar

import torch

from .. import distributed
from ..distributed import Reduction
from ..errors import DataError, DistributedError
from ..graph.first_tokens import (first_token_columns, first_token_mask, gather_rows, leading_columns, rows_of,
                                  scatter_rows)
from ..graph.roles import Role
from .fake_quant import fake_quantize, group_index, qparams_from_range, range_balanced_sizes
from .spec import SAMPLE_ESTIMATORS, Estimator, Granularity, QuantSpec

_TOKEN_MASK: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("outlierfx_token_mask", default=None)


_PAUSED: contextvars.ContextVar[bool] = contextvars.ContextVar("outlierfx_observers_paused", default=False)


@contextlib.contextmanager
def observation_paused() -> Iterator[None]:
    """Run a graph without observers recording (e.g. the pass manager's equivalence checks)."""
    token = _PAUSED.set(True)
    try:
        yield
    finally:
        _PAUSED.reset(token)


@contextlib.contextmanager
def quantizers_disabled(gm: torch.nn.Module) -> Iterator[None]:
    """Run a fake-quant graph in float (every :class:`FakeQuantize` the identity), e.g. to see its
    activations after the recipe's rewrites; each quantizer's own setting comes back afterwards."""
    quantizers = [m for m in gm.modules() if isinstance(m, FakeQuantize)]
    saved = [q.enabled for q in quantizers]
    for q in quantizers:
        q.enabled = False
    try:
        yield
    finally:
        for q, enabled in zip(quantizers, saved):
            q.enabled = enabled


@contextlib.contextmanager
def token_mask(mask: torch.Tensor | None) -> Iterator[None]:
    """Tell observers which tokens are real (``mask[b, s] != 0``) while a batch runs."""
    token = _TOKEN_MASK.set(None if mask is None else mask.bool())
    try:
        yield
    finally:
        _TOKEN_MASK.reset(token)


_ATTENTION_MATRICES = frozenset({Role.ATTN_SCORES, Role.ATTN_PROBS})

def _token_layout(x: torch.Tensor, roles: frozenset) -> bool:
    """Whether ``x`` is laid out ``[batch, seq, ...]`` (positions on axis 1): the mask's shape
    when one is published, else the roles (attention matrices and per-head contexts are not;
    a per-head context ``[batch, heads, seq, head_dim]`` is not even when it has as many heads
    as tokens and so the mask's shape on its first two axes)."""
    if x.dim() < 3 or roles & _ATTENTION_MATRICES or _is_per_head_context(x, roles):
        return False
    mask = _TOKEN_MASK.get()
    if mask is not None:
        return tuple(x.shape[:2]) == tuple(mask.shape)
    return Role.ATTN_CONTEXT not in roles


def _is_per_head_context(x: torch.Tensor, roles: frozenset) -> bool:
    """An attention context before its heads are merged, ``[batch, heads, seq, head_dim]``."""
    return Role.ATTN_CONTEXT in roles and x.dim() == 4


def _token_rows(x: torch.Tensor, roles: frozenset = frozenset()) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` as rows of real tokens ``[N, C]`` (padding dropped), and for ``[batch, heads, seq,
    seq]`` attention tensors the mask of real keys for those rows (None otherwise).

    The tensor's roles tell attention matrices apart (a context ``[batch, heads, seq, head_dim]``
    has the same shape when head_dim equals the length) and put a per-head context's positions
    on axis 2 (with as many heads as tokens, axes 0-1 have the mask's shape: taking ``x[mask]``
    there kept some heads of every position, padding included, and dropped the others: at W16A16
    the real tokens' contexts were then clipped by up to 1.2e-1 of the output's max on 1-layer
    Mistral/Gemma); without roles the shape decides."""
    mask = _TOKEN_MASK.get()
    attention = bool(roles & _ATTENTION_MATRICES) if roles else True
    # attention [batch, heads, seq, seq] first: with as many heads as tokens it also matches
    # the [batch, seq, ...] test below
    if mask is not None and attention and x.dim() == 4 and x.shape[0] == mask.shape[0] \
            and x.shape[2] == x.shape[3] == mask.shape[1]:
        rows = x.transpose(1, 2)[mask]  # [real queries, heads, keys]
        keys = mask[:, None, :].expand(-1, x.shape[2], -1)[mask]  # [real queries, keys]
        keys = keys[:, None, :].expand_as(rows)
        return rows.reshape(-1, x.shape[-1]), keys.reshape(-1, x.shape[-1])
    if mask is not None and _is_per_head_context(x, roles) and x.shape[0] == mask.shape[0] \
            and x.shape[2] == mask.shape[1]:  # [batch, heads, seq, head_dim]: positions on axis 2
        return x.transpose(1, 2)[mask].reshape(-1, x.shape[-1]), None
    if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):  # [batch, seq, hidden...]
        rows = x if bool(mask.all()) else x[mask]
        return rows.reshape(-1, x.shape[-1]), None
    return x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1), None


class Observer(torch.nn.Module):
    """Records the range of the tensor passing through (see module docstring)."""

    # How each statistic merges across data-parallel ranks (outlierfx.distributed): the learned
    # range is set after calibration, not collected, so it is not among them.
    STATISTICS: ClassVar[Mapping[str, Reduction]] = {
        "min_val": Reduction.MIN, "max_val": Reduction.MAX, "sink_min": Reduction.MIN, "sink_max": Reduction.MAX,
        "token_max": Reduction.CONCAT, "token_min": Reduction.CONCAT, "samples": Reduction.CONCAT,
        "batches": Reduction.SUM}

    def __init__(self, spec: QuantSpec, name: str = "", roles: frozenset = frozenset()) -> None:
        super().__init__()
        if spec.estimator in SAMPLE_ESTIMATORS and spec.granularity is not Granularity.PER_TENSOR:
            raise ValueError(f"an activation observer supports estimator {spec.estimator.value} per tensor only")
        self.spec = spec
        self.name = name
        self.roles = roles  # what the tensor is (outlierfx.graph.roles.Role), for later passes
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))
        self.register_buffer("samples", torch.empty(0))
        self.register_buffer("token_max", torch.empty(0))
        self.register_buffer("token_min", torch.empty(0))
        self.register_buffer("batches", torch.zeros((), dtype=torch.long))
        self.register_buffer("learned_lo", torch.empty(0))  # Estimator.LEARNED: set by LearnRanges
        self.register_buffer("learned_hi", torch.empty(0))
        self.register_buffer("sink_min", torch.empty(0))  # spec.sink_tokens: range of the first positions
        self.register_buffer("sink_max", torch.empty(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _PAUSED.get():
            with torch.no_grad():
                self.observe(x)
        return x

    @property
    def per_channel(self) -> bool:
        return self.spec.granularity is not Granularity.PER_TENSOR

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach()
        n = self.spec.sink_tokens
        if n and x.shape[1:2] and x.shape[1] > n and _token_layout(x, self.roles):
            mask = _TOKEN_MASK.get()
            # each text's first real tokens, wherever left padding puts them (what FakeQuantize
            # puts on the first-token grid); the other real tokens are the main range's
            first = leading_columns(x, n) if mask is None else first_token_mask(mask, None, n)
            self._observe_sink(x[first])
            if bool(first[:, :n].all()) and not bool(first[:, n:].any()):  # columns 0..n-1: no copy
                with token_mask(None if mask is None else mask[:, n:]):
                    return self._observe(x[:, n:])
            with token_mask(~first if mask is None else mask & ~first):
                return self._observe(x)
        return self._observe(x)

    def _observe_sink(self, x: torch.Tensor) -> None:
        if not x.numel():
            return
        lo, hi = torch.aminmax(x.float())
        if self.sink_min.numel():
            lo, hi = torch.minimum(self.sink_min, lo), torch.maximum(self.sink_max, hi)
        self.sink_min, self.sink_max = lo, hi

    def _observe(self, x: torch.Tensor) -> None:
        axis = self.spec.axis % x.dim() if x.dim() else 0
        if self.per_channel and axis != x.dim() - 1:
            rows, keys = x.movedim(axis, -1).reshape(-1, x.shape[axis]), None
        else:
            rows, keys = _token_rows(x, self.roles)
        if rows.numel() == 0:
            return
        rows = rows.float()
        # per-batch reduction: per channel, or per token (rows) and then per tensor
        if self.per_channel:
            lo, hi = torch.aminmax(rows, dim=0)
        elif keys is None:
            row_lo, row_hi = torch.aminmax(rows, dim=1)
            lo, hi = row_lo.min(), row_hi.max()
        else:  # attention rows: ignore padded keys
            row_lo = torch.where(keys, rows, torch.inf).amin(1)
            row_hi = torch.where(keys, rows, -torch.inf).amax(1)
            lo, hi = row_lo.min(), row_hi.max()
        if not (bool(torch.isfinite(lo).all()) and bool(torch.isfinite(hi).all())):  # NaN propagates into min/max
            raise DataError(f"NaN or inf reached the observer at {self.name or 'an activation'}; "
                            f"check the calibration inputs and the model's numerics")
        # aggregation across batches
        first = self.batches.item() == 0
        if self.spec.estimator is Estimator.RUNNING_MINMAX and not first:
            m = self.spec.momentum
            self.min_val, self.max_val = m * self.min_val + (1 - m) * lo, m * self.max_val + (1 - m) * hi
        elif first:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val, self.max_val = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)
        if not self.per_channel:  # per-token extremes: token-wise clipping reads them later
            self.token_max = torch.cat([self.token_max, row_hi])
            self.token_min = torch.cat([self.token_min, row_lo])
        if self.spec.estimator in (Estimator.PERCENTILE, Estimator.MSE):
            self._keep_samples(rows.reshape(-1) if keys is None else rows[keys])
        self.batches += 1

    def _keep_samples(self, flat: torch.Tensor) -> None:
        self.samples = self._within_budget(torch.cat([self.samples, flat]))

    def _within_budget(self, samples: torch.Tensor) -> torch.Tensor:
        """``samples``, or a uniform subsample of ``spec.max_samples`` of them (deterministic per
        observer: seeded by the batches seen)."""
        budget = self.spec.max_samples
        if samples.numel() <= budget:
            return samples
        generator = torch.Generator().manual_seed(int(self.batches.item()))
        return samples[torch.randperm(samples.numel(), generator=generator)[:budget]]

    def with_learned_range(self, lo: torch.Tensor, hi: torch.Tensor) -> Observer:
        """A new observer with the same statistics whose range is ``[lo, hi]`` (scalars, or one
        value per channel for per-channel and per-group specs)."""
        new = self.with_spec(self.spec.with_(estimator=Estimator.LEARNED))
        new.learned_lo, new.learned_hi = lo.detach().clone().float(), hi.detach().clone().float()
        return new

    def with_spec(self, spec: QuantSpec) -> Observer:
        """A new observer with the same statistics and another spec (e.g. a clipping alpha)."""
        if (spec.granularity is Granularity.PER_TENSOR) != (self.spec.granularity is Granularity.PER_TENSOR):
            raise ValueError("with_spec cannot switch between per-tensor and per-channel statistics")
        new = Observer(spec, self.name, self.roles)
        for name, buffer in self.named_buffers(recurse=False):
            setattr(new, name, buffer)
        return new

    def permutation(self) -> tuple[int, ...] | None:
        """The channel order of a grouped quantizer: given, or sorted by calibrated range."""
        if self.spec.granularity is not Granularity.PER_GROUP:
            return None
        if self.spec.sort_channels:  # by the calibrated min-max range, whatever the estimator
            return tuple(int(i) for i in torch.argsort(self.max_val - self.min_val, stable=True))
        return self.spec.permutation

    def group_index(self) -> torch.Tensor:
        """The group of each channel of a grouped quantizer (sorted, and sized per the spec)."""
        widths = self.max_val - self.min_val
        permutation = self.permutation()
        sizes = None
        if self.spec.grouping == "range" and self.spec.groups < widths.numel():
            sizes = range_balanced_sizes(widths[list(permutation)], self.spec.groups)  # type: ignore[arg-type]
        return group_index(widths.numel(), self.spec.groups, permutation, sizes)

    @property
    def calibrated(self) -> bool:
        return self.batches.item() > 0

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (lo, hi) the estimator chose: scalars, or per-channel vectors."""
        if not self.calibrated:
            raise DataError(f"observer {self.name or ''} saw no data: run calibrate() first")
        est = self.spec.estimator
        if est is Estimator.PERCENTILE:
            p = self.spec.percentile / 100.0
            return torch.quantile(self.samples, 1 - p), torch.quantile(self.samples, p)
        if est is Estimator.MSE:
            return mse_range(self.samples, self.min_val, self.max_val, self.spec)
        if est is Estimator.TOKEN_QUANTILE:
            a = self.spec.token_alpha
            lo, hi = torch.quantile(self.token_min, 1 - a), torch.quantile(self.token_max, a)
            # per-token rows of attention tensors include padded keys: never leave [min, max]
            return torch.maximum(lo, self.min_val), torch.minimum(hi, self.max_val)
        if est is Estimator.LEARNED:
            if not self.learned_lo.numel():
                raise DataError(f"observer {self.name or ''} has a learned estimator but no learned range")
            return self.learned_lo, self.learned_hi
        return self.min_val, self.max_val

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of the main grid (with a first-token grid, the other positions)."""
        return self.grids()[0]

    def grids(self) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
        """The main grid's scale and zero point, and the first ``spec.sink_tokens`` positions'
        (None: not seen, or they share the main grid).

        A per-tensor quantizer keeps the first-token grid only where the first tokens would widen
        the main range by ``spec.sink_min_widening`` or more (by default: wherever they do not
        fit it; MiniLM's [CLS] triples its GELU outputs' range). Elsewhere the main grid covers
        them too: a second grid would only refine one token, at the price of two-grid codes and
        a second GEMM over their rows in every int8 path."""
        lo, hi = self.range()
        if self.spec.granularity is Granularity.PER_GROUP:
            groups = self.group_index()
            glo = torch.full((self.spec.groups,), float("inf")).scatter_reduce(0, groups, lo, "amin")
            ghi = torch.full((self.spec.groups,), float("-inf")).scatter_reduce(0, groups, hi, "amax")
            scale, zero_point = qparams_from_range(glo, ghi, self.spec)
            return (scale[groups], zero_point[groups]), self._sink_grid()
        main, sink = qparams_from_range(lo, hi, self.spec), self._sink_grid()
        if sink is None or self.per_channel:
            return main, sink
        shared = self._shared_grid(main, lo, hi)
        return (main, sink) if shared is None else (shared, None)

    def sink_qparams(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Scale and zero point of the first ``spec.sink_tokens`` positions (see :meth:`grids`)."""
        return self.grids()[1]

    def _sink_grid(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.spec.sink_tokens or not self.sink_min.numel():
            return None
        return qparams_from_range(self.sink_min, self.sink_max, self.spec.sink_spec())

    def _shared_grid(self, main: tuple[torch.Tensor, torch.Tensor], lo: torch.Tensor,
                     hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The per-tensor grid covering the first tokens as well, where it is ``main`` or widens
        it by less than ``spec.sink_min_widening``; None where the first tokens need their own."""
        scale, zero_point = main
        covered = (self.spec.qmin - zero_point) * scale, (self.spec.qmax - zero_point) * scale
        if bool((self.sink_min >= covered[0]).all() and (self.sink_max <= covered[1]).all()):
            return main
        wide = qparams_from_range(torch.minimum(lo, self.sink_min), torch.maximum(hi, self.sink_max), self.spec)
        return wide if float(wide[0] / scale) < self.spec.sink_min_widening else None

    def extra_repr(self) -> str:
        return f"{self.name}: {self.spec.describe()}"


def check_mergeable(observers: Sequence[Observer]) -> None:
    """Refuse, before any batch runs, statistics that data-parallel ranks cannot merge: a
    running min-max depends on the order of the batches. Nothing to refuse in one process."""
    if not distributed.active():
        return
    running = [o.name for o in observers if o.spec.estimator is Estimator.RUNNING_MINMAX]
    if running:
        raise DistributedError(f"{len(running)} observers (e.g. {running[0]}) use the running min-max estimator, "
                               f"whose average depends on the order of the batches, so ranks cannot merge it; use "
                               f"min-max (or run one process)")


def merge_across_ranks(observers: Sequence[Observer]) -> None:
    """Give every data-parallel rank the statistics of all ranks' batches (the identity in one
    process). Per-token extremes and samples come in rank order, not batch order: the quantiles
    read from them do not depend on it; samples over ``max_samples`` are subsampled again, so
    percentile and MSE ranges then rest on another uniform subsample than one process draws."""
    if not distributed.active():
        return
    check_mergeable(observers)
    distributed.reduce_statistics(observers)
    for observer in observers:
        observer.samples = observer._within_budget(observer.samples)


def mse_range(samples: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec,
              grid: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink [lo, hi] by the factor in (0, 1] that minimises the fake-quant MSE on ``samples``."""
    best, best_err = (lo, hi), float("inf")
    for i in range(grid, 0, -1):
        c = i / grid
        scale, zp = qparams_from_range(lo * c, hi * c, spec)
        err = float((fake_quantize(samples, scale, zp, spec) - samples).pow(2).mean())
        if err < best_err:
            best, best_err = (lo * c, hi * c), err
    return best


class FakeQuantize(torch.nn.Module):
    """Quantize-dequantize with fixed parameters; ``enabled=False`` makes it the identity."""

    def __init__(self, spec: QuantSpec, scale: torch.Tensor, zero_point: torch.Tensor, name: str = "",
                 roles: frozenset = frozenset()) -> None:
        super().__init__()
        self.spec = spec
        self.name = name
        self.roles = roles  # what the tensor is (outlierfx.graph.roles.Role), kept from the observer
        self.enabled = True
        self.register_buffer("scale", scale.detach().clone().float())
        self.register_buffer("zero_point", zero_point.detach().clone().to(torch.int32))
        self.register_buffer("sink_scale", torch.empty(0))  # the first spec.sink_tokens positions' grid
        self.register_buffer("sink_zero_point", torch.empty(0, dtype=torch.int32))

    @classmethod
    def from_observer(cls, observer: Observer) -> FakeQuantize:
        (scale, zero_point), sink = observer.grids()  # one range search (an MSE range is one)
        fq = cls(observer.spec, scale, zero_point, observer.name, observer.roles)
        if sink is not None:
            fq.sink_scale, fq.sink_zero_point = sink[0].float(), sink[1].to(torch.int32)
        return fq

    @property
    def has_sink_grid(self) -> bool:
        return bool(self.spec.sink_tokens and self.sink_scale.numel())

    def forward(self, x: torch.Tensor, first_tokens: torch.Tensor | None = None) -> torch.Tensor:
        if not self.enabled:
            return x
        return self.on_grids(x, fake_quantize, first_tokens)

    def on_grids(self, x: torch.Tensor, quantize: Callable[..., torch.Tensor],
                 first_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """``quantize(x, scale, zero_point, spec)`` on the main grid; with a sink grid, each
        text's first ``spec.sink_tokens`` tokens of a ``[batch, seq, ...]`` tensor on theirs:
        where ``first_tokens`` ``[batch, seq]`` says (the graph's
        :func:`~outlierfx.graph.first_tokens.first_token_mask`: left padding moves them, a decode
        step behind a filled cache has none), else the first columns of a call longer than that."""
        main = quantize(x, self.scale, self.zero_point, self.spec)
        if not self.has_sink_grid or x.dim() < 3:
            return main
        n = self.spec.sink_tokens
        first = rows_of(first_tokens, x, n)
        # only the batch x n first-token rows on their grid, gathered and put back in place as
        # the reference form does: static shapes, so a traced graph keeps it
        head_rows = gather_rows(x, first_token_columns(first, n))
        head = quantize(head_rows, self.sink_scale, self.sink_zero_point, self.spec.sink_spec())
        return scatter_rows(main, head, first)

    def extra_repr(self) -> str:
        return f"{self.name}: {self.spec.describe()}"
