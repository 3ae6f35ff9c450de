"""Quantization specs: frozen, validated descriptions of how one tensor is quantized."""

from __future__ import annotations

import dataclasses
import enum

MIN_BITS, MAX_BITS = 2, 16  # the widths fake quantization simulates (int8 kernels run 8 bits)


class Granularity(enum.Enum):
    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"
    PER_GROUP = "per_group"  # K groups of channels along ``axis`` (PEG), optionally permuted


class Estimator(enum.Enum):
    MINMAX = "minmax"  # min/max over all calibration data
    RUNNING_MINMAX = "running_minmax"  # exponential moving average of per-batch min/max
    PERCENTILE = "percentile"  # the p-th / (100-p)-th percentile of the values
    MSE = "mse"  # clipping range minimising the quantization MSE (activations: per tensor; weights: per row)
    TOKEN_QUANTILE = "token_quantile"  # alpha-quantile of per-token max/min (token-wise clipping)
    LEARNED = "learned"  # a range learned against the model's output (LearnRanges, LSQ+ style)


_PER_TENSOR_ONLY = (Estimator.PERCENTILE, Estimator.TOKEN_QUANTILE)
# estimators that need samples an activation observer keeps for per-tensor specs only
SAMPLE_ESTIMATORS = (Estimator.PERCENTILE, Estimator.MSE, Estimator.TOKEN_QUANTILE)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor.

    ``signed`` defaults to ``symmetric``: symmetric grids are signed (int8: -128..127, scale from
    max |x| / 127), asymmetric ones unsigned (uint8: 0..255 with a zero point).
    """

    bits: int = 8
    symmetric: bool = False
    signed: bool | None = None
    granularity: Granularity = Granularity.PER_TENSOR
    axis: int = -1
    groups: int = 1
    permutation: tuple[int, ...] | None = None
    sort_channels: bool = False  # PER_GROUP: permutation = channels sorted by calibrated range (PEG)
    # PER_GROUP with sort_channels: "equal" groups (the paper), or "range": group sizes that
    # minimise the summed squared step over channels (outlier channels get groups of their own)
    grouping: str = "equal"
    estimator: Estimator = Estimator.MINMAX
    percentile: float = 99.99
    momentum: float = 0.9
    token_alpha: float = 1.0
    max_samples: int = 1 << 18  # values kept for percentile / MSE estimation (a uniform subsample)
    # activations laid out [batch, seq, ...]: the first ``sink_tokens`` positions of each sequence
    # get a per-tensor grid of their own and stay out of the main range (attention-sink tokens
    # carry massive activations, Sun et al. 2024)
    sink_tokens: int = 0
    # sink_tokens on a per-tensor spec: keep the first-token grid only where covering those tokens
    # would widen the main grid by this factor or more (else the main grid covers them and every
    # int8 path saves a second GEMM over their rows); 1: wherever they do not fit (the default)
    sink_min_widening: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {self.bits!r}")
        if self.signed is None:
            object.__setattr__(self, "signed", self.symmetric)
        if not isinstance(self.sink_tokens, int) or self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be an integer >= 0, got {self.sink_tokens!r}")
        if not self.sink_min_widening >= 1.0:
            raise ValueError(f"sink_min_widening must be >= 1, got {self.sink_min_widening!r}")
        if self.granularity is Granularity.PER_GROUP:
            if self.groups < 1:
                raise ValueError(f"groups must be >= 1, got {self.groups}")
            if self.permutation is not None and sorted(self.permutation) != list(range(len(self.permutation))):
                raise ValueError("permutation must be a bijection of 0..n-1")
            if self.sort_channels and self.permutation is not None:
                raise ValueError("give either a permutation or sort_channels=True, not both")
            if self.grouping not in ("equal", "range"):
                raise ValueError(f"grouping must be 'equal' or 'range', got {self.grouping!r}")
            if self.grouping == "range" and not self.sort_channels:
                raise ValueError("grouping='range' sizes groups over sorted channels: it needs sort_channels=True")
        elif self.groups != 1 or self.permutation is not None or self.sort_channels or self.grouping != "equal":
            raise ValueError("groups, permutation, sort_channels and grouping need granularity=PER_GROUP")
        if self.estimator in _PER_TENSOR_ONLY and self.granularity is not Granularity.PER_TENSOR:
            raise ValueError(f"estimator {self.estimator.value} supports per-tensor granularity only")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0.0 < self.token_alpha <= 1.0:
            raise ValueError(f"token_alpha must be in (0, 1], got {self.token_alpha}")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    def with_(self, **changes: object) -> QuantSpec:
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        gran = {Granularity.PER_TENSOR: "per-tensor", Granularity.PER_CHANNEL: f"per-channel(axis {self.axis})",
                Granularity.PER_GROUP: f"per-group(K={self.groups}{', sorted' if self.sort_channels else ''}"
                                       f"{', range-sized' if self.grouping == 'range' else ''})"}[self.granularity]
        sink = f", first {self.sink_tokens} token(s) on their own grid" if self.sink_tokens else ""
        if self.sink_tokens and self.sink_min_widening != 1.0:
            sink += f" where they widen the range >= {self.sink_min_widening:g}x"
        return f"{'int' if self.signed else 'uint'}{self.bits} {kind} {gran} {self.estimator.value}{sink}"

    def sink_spec(self) -> QuantSpec:
        """The grid of the first ``sink_tokens`` positions: per tensor, min-max, same width."""
        return QuantSpec(bits=self.bits, symmetric=self.symmetric, signed=self.signed)


def weight_spec(bits: int = 8) -> QuantSpec:
    """Default for Linear weights: symmetric, per output channel, min-max."""
    return QuantSpec(bits=bits, symmetric=True, granularity=Granularity.PER_CHANNEL, axis=0)


def activation_spec(bits: int = 8, estimator: Estimator = Estimator.MINMAX) -> QuantSpec:
    """Default for activations: asymmetric per-tensor (the paper's static scheme)."""
    return QuantSpec(bits=bits, symmetric=False, estimator=estimator)
