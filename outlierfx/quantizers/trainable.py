"""Trainable (straight-through) quantizers: fake quantization that lets gradients through.

- :class:`TrainableActivationQuantizer` wraps a calibrated :class:`FakeQuantize` (fixed range,
  straight-through inside it); :class:`TrainableWeightQuantizer` quantizes a computed weight
  exactly as :class:`~outlierfx.passes.convert_fake_quant.ConvertToFakeQuant` quantizes a
  stored one. Quadapter and QAT train through both.
- :class:`LearnableRange` makes the range itself learnable (LSQ+); LearnRanges trains it.

Each forward pass is bit-identical to the fake quantization the conversion will produce.
"""

from __future__ import annotations

import math

import torch

from .fake_quant import MIN_SCALE, _broadcast, fake_quantize, quantize_weight
from .observers import FakeQuantize, Observer
from .spec import Granularity, QuantSpec


class _STEFakeQuantize(torch.autograd.Function):
    """Forward: exactly ``fake_quantize``. Backward: straight-through inside the grid's range."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, spec):  # type: ignore[no-untyped-def, override]
        y = fake_quantize(x, scale, zero_point, spec)
        step = scale if spec.granularity.value == "per_tensor" else _broadcast(scale, x, spec.axis)
        ctx.save_for_backward((y - x).abs() <= step * 0.5001)  # not clamped
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def, override]
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None


class TrainableActivationQuantizer(torch.nn.Module):
    """A :class:`FakeQuantize` that lets gradients through (straight-through estimator)."""

    def __init__(self, fq: FakeQuantize) -> None:
        super().__init__()
        self.fq = fq

    @property
    def enabled(self) -> bool:
        return self.fq.enabled

    def forward(self, x: torch.Tensor, first_tokens: torch.Tensor | None = None) -> torch.Tensor:
        if not self.fq.enabled:
            return x
        return self.fq.on_grids(x, _STEFakeQuantize.apply, first_tokens)


class TrainableWeightQuantizer(torch.nn.Module):
    """Quantizes a computed weight (``W * 1/s``) exactly as ConvertToFakeQuant quantizes a stored one."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        self.spec = spec
        self.enabled = True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        _, scale, zero_point = quantize_weight(w, self.spec)
        return _STEFakeQuantize.apply(w, scale, zero_point, self.spec)


def _round_ste(t: torch.Tensor) -> torch.Tensor:
    """Round forward, identity backward."""
    return t + (torch.round(t) - t).detach()


class LearnableRange(torch.nn.Module):
    """Fake quantization whose range [lo, hi] is a parameter (one value per tensor, group or channel).

    ``lo = lo0 + width * u_lo`` (and likewise hi) with ``u`` learned from 0: Adam's steps are then
    relative to each quantizer's own range, whatever its magnitude. ``tied``: one ``u`` pair for
    all groups of the quantizer (each group moves by the same fraction of its own width), which
    keeps per-channel quantizers from fitting the calibration batches' noise.
    """

    def __init__(self, observer: Observer, tied: bool = False) -> None:
        super().__init__()
        self.spec: QuantSpec = observer.spec
        self.name = observer.name
        lo, hi = (t.detach().float() for t in observer.range())
        if self.spec.granularity is Granularity.PER_GROUP:
            index = observer.group_index()
            lo = torch.full((self.spec.groups,), math.inf).scatter_reduce(0, index, lo, "amin")
            hi = torch.full((self.spec.groups,), -math.inf).scatter_reduce(0, index, hi, "amax")
        else:
            index = torch.arange(lo.numel()) if lo.dim() else torch.zeros((), dtype=torch.long)
        self.register_buffer("index", index)  # channel -> learned value
        self.register_buffer("lo0", lo)
        self.register_buffer("hi0", hi)
        self.register_buffer("width", (hi - lo).abs().clamp_min(MIN_SCALE))
        self.u_lo = torch.nn.Parameter(torch.zeros(()) if tied else torch.zeros_like(lo))
        self.u_hi = torch.nn.Parameter(torch.zeros(()) if tied else torch.zeros_like(hi))

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current range, expanded to one value per channel (scalars for per-tensor)."""
        lo, hi = self.lo0 + self.width * self.u_lo, self.hi0 + self.width * self.u_hi
        if lo.dim():
            lo, hi = lo[self.index], hi[self.index]
        return lo, hi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        lo, hi = self.bounds()
        lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)  # the grid holds 0 exactly
        if spec.symmetric:
            scale = (torch.maximum(-lo, hi) / spec.qmax).clamp_min(MIN_SCALE)
            zero_point = torch.zeros_like(scale)
        else:
            scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp_min(MIN_SCALE)
            zero_point = torch.clamp(spec.qmin - _round_ste(lo / scale), spec.qmin, spec.qmax)
        if scale.dim():
            scale, zero_point = _broadcast(scale, x, spec.axis), _broadcast(zero_point, x, spec.axis)
        q = torch.clamp(_round_ste(x * (1.0 / scale)) + zero_point, spec.qmin, spec.qmax)
        return ((q - zero_point) * scale).to(x.dtype)
