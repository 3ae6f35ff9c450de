"""Quantization arithmetic: scale/zero-point from a range, and quantize-dequantize.

Numerics follow what integer backends do: q = clamp(round_half_even(x / scale) + zero_point,
qmin, qmax), x_hat = (q - zero_point) * scale. The range always includes 0 so that 0 (padding,
ReLU zeros) is exact.
"""

from __future__ import annotations

import torch

from .spec import Estimator, Granularity, QuantSpec

MIN_SCALE = 1e-8


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) for ranges ``[lo, hi]`` (any matching shapes)."""
    lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
    hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
    if spec.symmetric:
        amax = torch.maximum(-lo, hi)
        scale = (amax / spec.qmax).clamp_min(MIN_SCALE)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp_min(MIN_SCALE)
        zero_point = (spec.qmin - torch.round(lo / scale)).clamp(spec.qmin, spec.qmax).to(torch.int32)
    return scale, zero_point


def group_index(channels: int, groups: int, permutation: tuple[int, ...] | None,
                sizes: tuple[int, ...] | None = None) -> torch.Tensor:
    """Group of each channel: channels sorted by ``permutation`` are cut into ``groups``
    contiguous chunks, balanced (sizes differ by at most one) unless ``sizes`` are given."""
    if permutation is not None and len(permutation) != channels:
        raise ValueError(f"permutation has {len(permutation)} entries for {channels} channels")
    order = torch.tensor(permutation) if permutation is not None else torch.arange(channels)
    position = torch.empty(channels, dtype=torch.long)
    position[order] = torch.arange(channels)
    if sizes is None:
        return position * groups // channels
    if len(sizes) != groups or sum(sizes) != channels or min(sizes) < 1:
        raise ValueError(f"group sizes {sizes} do not split {channels} channels into {groups} groups")
    ends = torch.tensor(sizes).cumsum(0)
    return torch.bucketize(position, ends, right=True)


def range_balanced_sizes(sorted_widths: torch.Tensor, groups: int) -> tuple[int, ...]:
    """Sizes of ``groups`` contiguous groups over channels sorted by range width (ascending)
    that minimise the total quantization noise, sum over channels of (its group's width)^2:
    the few wide outlier channels get small groups of their own, the many narrow ones share.
    Exact dynamic programming over cut points, O(groups x channels^2) vectorised."""
    w2 = sorted_widths.double().pow(2)
    channels = w2.numel()
    groups = min(groups, channels)
    j = torch.arange(1, channels + 1, dtype=torch.float64)  # group end (exclusive), 1..C
    i = torch.arange(0, channels, dtype=torch.float64)  # group start, 0..C-1
    allowed = i[:, None] < j[None, :]
    best = torch.full((channels + 1,), float("inf"), dtype=torch.float64)
    best[0] = 0.0
    choices = []
    for _ in range(groups):
        # cost of a group [i, j): (j - i) * width[j - 1]^2, added to the best split of [0, i)
        cost = best[:-1, None] + (j[None, :] - i[:, None]) * w2[None, :]
        cost = torch.where(allowed, cost, torch.inf)
        value, start = cost.min(0)
        best = torch.cat([torch.full((1,), float("inf"), dtype=torch.float64), value])
        choices.append(start)
    sizes, end = [], channels
    for start in reversed(choices):
        begin = int(start[end - 1])
        sizes.append(end - begin)
        end = begin
    return tuple(reversed(sizes))


def _broadcast(param: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    axis = axis % x.dim()
    shape = [1] * x.dim()
    shape[axis] = -1
    return param.reshape(shape)


def _integers(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if spec.granularity is not Granularity.PER_TENSOR:
        scale, zero_point = _broadcast(scale, x, spec.axis), _broadcast(zero_point, x, spec.axis)
    # x * (1 / scale), as torch's quantize kernels compute it: the integer codes then agree with
    # a lowered model's even at rounding ties.
    return torch.clamp(torch.round(x * (1.0 / scale)) + zero_point, spec.qmin, spec.qmax), scale, zero_point


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Quantize-dequantize ``x``. Per-tensor params are scalars; per-channel and per-group
    params hold one value per channel along ``spec.axis`` (groups already expanded)."""
    q, scale, zero_point = _integers(x, scale, zero_point, spec)
    return ((q - zero_point) * scale).to(x.dtype)


def integer_dtype(spec: QuantSpec) -> torch.dtype:
    """The smallest integer dtype holding the spec's grid (int8/uint8 up to 8 bits)."""
    if spec.bits <= 8:
        return torch.int8 if spec.signed else torch.uint8
    return torch.int16 if spec.signed and spec.bits <= 16 else torch.int32


def quantize_to_integers(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
                         ) -> torch.Tensor:
    """The integer codes of ``x`` (what an int8 kernel stores): ``fake_quantize`` without the
    dequantization, as :func:`integer_dtype`."""
    return _integers(x, scale, zero_point, spec)[0].to(integer_dtype(spec))


def quantize_weight(weight: torch.Tensor, spec: QuantSpec, column_weights: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fake-quantized weight with its scale and zero point: the min-max range per the spec, or
    with ``Estimator.MSE`` the range shrunk per row (per tensor) by the factor that minimises
    that row's squared rounding + clipping error, each input column's error weighted by
    ``column_weights`` where given (e.g. the diagonal of the inputs' Gram matrix: how much an
    error in that column moves the output)."""
    w = weight.detach()
    if spec.granularity is Granularity.PER_TENSOR:
        lo, hi = w.min(), w.max()
        rows = w.reshape(1, -1)
    else:
        axis = spec.axis % w.dim()
        rows = w.movedim(axis, 0).reshape(w.shape[axis], -1)
        lo, hi = rows.min(1).values, rows.max(1).values
    if spec.estimator is not Estimator.MSE:
        scale, zero_point = qparams_from_range(lo, hi, spec)
        return fake_quantize(w, scale, zero_point, spec), scale, zero_point
    lo, hi = _mse_row_range(rows.float(), lo.float(), hi.float(), spec, column_weights)
    scale, zero_point = qparams_from_range(lo, hi, spec)
    return _clipped_fake_quantize(w, scale, zero_point, spec), scale, zero_point


def _clipped_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
                           ) -> torch.Tensor:
    """``fake_quantize`` for a clipped range. A symmetric grid stays within +-qmax (not down to
    qmin): the clipped extremes then sit exactly on +-qmax * scale, so the scale can be read back
    from the quantized weight by min-max (as lowering does)."""
    if spec.symmetric:
        restricted = fake_quantize(x, scale, zero_point, spec)
        bound = scale if spec.granularity is Granularity.PER_TENSOR else _broadcast(scale, x, spec.axis)
        return torch.clamp(restricted, -spec.qmax * bound, spec.qmax * bound).to(x.dtype)
    return fake_quantize(x, scale, zero_point, spec)


def _mse_row_range(rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec,
                   column_weights: torch.Tensor | None = None, candidates: int = 40, narrowest: float = 0.5
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the range ``c * [lo, hi]`` (c in [narrowest, 1]) with the smallest quantization MSE
    (each column's squared error times ``column_weights``, where given)."""
    if column_weights is not None:
        if not lo.dim() or column_weights.shape != rows.shape[1:]:
            raise ValueError(f"column weights need a per-row range over {rows.shape[1]} columns, got "
                             f"{tuple(column_weights.shape)}")
        column_weights = column_weights.float()
    flat = spec.with_(granularity=Granularity.PER_CHANNEL, axis=0) if lo.dim() else spec
    best_err = torch.full((rows.shape[0],), float("inf"))
    best_c = torch.ones(rows.shape[0])
    for c in torch.linspace(1.0, narrowest, candidates).tolist():
        scale, zero_point = qparams_from_range(lo * c, hi * c, flat)
        err = (_clipped_fake_quantize(rows, scale, zero_point, flat) - rows).pow(2)
        err = (err if column_weights is None else err * column_weights).sum(1)
        better = err < best_err
        best_err, best_c = torch.where(better, err, best_err), torch.where(better, c, best_c)
    if not lo.dim():
        best_c = best_c.squeeze(0)
    return lo * best_c, hi * best_c
