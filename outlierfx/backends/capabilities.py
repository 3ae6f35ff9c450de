"""What a backend's int8 kernels can run, as typed data (read before calibration too)."""

from __future__ import annotations

import dataclasses
import enum

from ..errors import OutlierFXError
from ..quantizers.spec import Granularity


class BackendError(OutlierFXError):
    """The requested integer backend is unknown or not available on this CPU."""


class PostOp(enum.Enum):
    """Work an int8 GEMM does on its output inside the kernel."""

    REQUANTIZE = "requantize"  # to the next quantizer's uint8 grid: the GEMM writes uint8
    GELU = "gelu"
    RESIDUAL_ADD = "residual add"  # a float residual added by the kernel (a binary post-op)


class FirstTokens(enum.Enum):
    """How an int8 GEMM handles first tokens that have a grid of their own (``QuantSpec.sink_tokens``)."""

    NONE = "none"  # the input has no first-token grid
    SECOND_GEMM = "second GEMM"  # reference form: their rows again, by a GEMM of batch x n rows
    TWO_GEMMS = "two GEMMs"  # torch.ao engines: one GEMM on the first rows, one on the rest
    CORRECTED = "corrected"  # onednn: one GEMM on two-grid codes, first rows corrected in closed form
    RECOMPUTED = "recomputed"  # onednn with a post-op: their rows again, by a batch x n GEMM, same post-ops
    OUTPUT_GRID = "output grid"  # onednn: one input grid, first rows requantized to their own output grid

    @property
    def needs_float_output(self) -> bool:
        """The eager engines run a first-token input only in GEMMs whose output stays float
        (or whose requantization onednn fuses to a first-token output grid)."""
        return self in (FirstTokens.TWO_GEMMS, FirstTokens.CORRECTED)


class Execution(enum.Enum):
    REFERENCE = "reference"  # decomposed quantize/dequantize ops, run eagerly by torch
    EAGER_KERNELS = "eager int8 kernels"  # packed int8 GEMMs called one by one
    COMPILED = "compiled"  # the reference form compiled by torch.compile/inductor


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a backend runs in int8; a recipe keeps only the transforms that survive lowering.

    ``whole_gemm_granularities``: activation granularities whose Linears run as one int8 GEMM
    (PEG groups that share one grid count as per-tensor). ``peg_sub_gemms``: a PEG-grouped
    input runs as K int8 sub-GEMMs summed in float (needs a float-output GEMM).
    ``first_token_rows``: how a per-tensor input whose first tokens have a grid of their own runs
    in int8 (``NONE``: it falls back to float). ``unsigned_activations_only``: the kernels read
    uint8 codes (a signed first-token grid cannot be lowered). ``post_ops``: what the GEMM fuses.
    ``bf16_attention``: fused attention behind int8 Q/K/V GEMMs can run in bfloat16.
    ``float_output_gemm``: an int8 GEMM whose output stays float (else only requantized GEMMs
    run in int8). ``float_fallback``: a Linear the kernels cannot take runs as a float GEMM (on
    its int8 weights) instead of failing."""

    whole_gemm_granularities: frozenset[Granularity]
    peg_sub_gemms: bool
    first_token_rows: FirstTokens
    unsigned_activations_only: bool
    post_ops: frozenset[PostOp]
    bf16_attention: bool
    float_output_gemm: bool
    execution: Execution
    float_fallback: bool = True

    def __post_init__(self) -> None:
        if self.peg_sub_gemms and not self.float_output_gemm:
            raise ValueError("PEG sub-GEMMs are summed in float: they need a float-output int8 GEMM")
        if self.first_token_rows.needs_float_output and not self.float_output_gemm:
            raise ValueError(f"first tokens by {self.first_token_rows.value} need a float-output int8 GEMM")

    def describe(self) -> str:
        parts = ["int8 GEMMs on " + "/".join(sorted(g.value for g in self.whole_gemm_granularities)) + " activations"]
        parts.append("PEG groups as int8 sub-GEMMs" if self.peg_sub_gemms else "PEG groups in float")
        parts.append("first-token grids in float" if self.first_token_rows is FirstTokens.NONE
                     else f"first-token grids in int8 ({self.first_token_rows.value})")
        if self.post_ops:
            parts.append("fused: " + ", ".join(sorted(p.value for p in self.post_ops)))
        if not self.float_output_gemm:
            parts.append("no float-output int8 GEMM")
        if self.bf16_attention:
            parts.append("bf16 attention")
        parts.append(self.execution.value)
        return "; ".join(parts)
