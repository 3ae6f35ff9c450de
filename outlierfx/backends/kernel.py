"""The kernel a Linear gets, as typed data: the Lower plan's entries, and nothing parses text."""

from __future__ import annotations

import dataclasses
import enum

from .capabilities import FirstTokens, PostOp


class KernelKind(enum.Enum):
    INT8_GEMM = "int8 GEMM"
    INT8_SUB_GEMMS = "int8 sub-GEMMs"  # one per PEG channel group, summed in float
    FLOAT_GEMM_INT8_WEIGHTS = "float GEMM on int8 weights"  # a fallback: weights stored as int8
    FLOAT_GEMM = "float GEMM"  # weight not quantized

    @property
    def is_int8(self) -> bool:
        return self in (KernelKind.INT8_GEMM, KernelKind.INT8_SUB_GEMMS)


class Output(enum.Enum):
    UINT8 = "requantized uint8"
    FLOAT = "float"


class Fallback(enum.Enum):
    """Why a Linear runs as a float GEMM."""

    WEIGHT_NOT_QUANTIZED = "weight not quantized by the policy"
    INPUT_NOT_QUANTIZED = "input not quantized by the policy"
    INPUT_WIDER_THAN_8_BIT = "input simulated: wider than 8 bit, no integer kernel"
    INPUT_TWO_GRIDS = "input simulated: first token(s) on a grid of their own that the kernels cannot take"
    SIGNED_INPUT = "input on a signed grid; the kernels read uint8 codes"
    NO_FLOAT_OUTPUT_GEMM = "output stays float; the backend has no float-output int8 GEMM"
    NO_SUB_GEMMS = "the backend has no float-output int8 GEMM to sum PEG sub-GEMMs in"
    TOO_MANY_GROUPS = "more PEG groups than max_sub_gemms: sub-GEMMs would cost more than they save"


_FIRST_TOKENS_TEXT = {
    FirstTokens.SECOND_GEMM: "first token(s) on their own grid (their rows again, by a second GEMM)",
    FirstTokens.TWO_GEMMS: "first token(s) on their own input grid (2 GEMMs)",
    FirstTokens.CORRECTED: "first token(s) on their own grid (their rows corrected in closed form)",
    FirstTokens.RECOMPUTED: "first token(s) on their own grid (their rows again, by a batch x n GEMM)",
    FirstTokens.OUTPUT_GRID: "first token(s) requantized to their own output grid (their rows again, by a batch x n GEMM)",
}


@dataclasses.dataclass(frozen=True)
class Kernel:
    """How one Linear runs. ``post_ops`` holds ``REQUANTIZE`` when the GEMM writes uint8 for the
    next quantizer; ``groups``: PEG channel groups of the input (sub-GEMMs, or the count that
    made it fall back); ``merged_with``: other Linears reading the same input that run in the
    same GEMM (stacked weights); ``fallback``: why a float GEMM."""

    kind: KernelKind
    post_ops: frozenset[PostOp] = frozenset()
    first_tokens: FirstTokens = FirstTokens.NONE
    groups: int = 0
    fallback: Fallback | None = None
    merged_with: int = 0

    def __post_init__(self) -> None:
        if (self.fallback is None) != self.kind.is_int8:
            raise ValueError(f"a {self.kind.value} kernel {'needs' if not self.kind.is_int8 else 'takes no'} "
                             "fallback reason")
        if (self.kind is KernelKind.INT8_SUB_GEMMS) != (self.groups > 1 and self.fallback is None):
            raise ValueError("int8 sub-GEMMs, and only they, run over more than one PEG group")

    @classmethod
    def float_gemm(cls, why: Fallback, groups: int = 0) -> Kernel:
        kind = KernelKind.FLOAT_GEMM if why is Fallback.WEIGHT_NOT_QUANTIZED else KernelKind.FLOAT_GEMM_INT8_WEIGHTS
        return cls(kind, fallback=why, groups=groups)

    @property
    def is_int8(self) -> bool:
        return self.kind.is_int8

    @property
    def output(self) -> Output:
        return Output.UINT8 if PostOp.REQUANTIZE in self.post_ops else Output.FLOAT

    def describe(self) -> str:
        """One line for the plan text (never parsed back)."""
        if self.fallback is not None:
            groups = f"input in {self.groups} PEG groups; " if self.groups else ""
            return f"{self.kind.value} ({groups}{self.fallback.value})"
        if self.kind is KernelKind.INT8_SUB_GEMMS:
            return f"{self.groups} int8 sub-GEMMs (PEG groups), float sum"
        text = "int8 GEMM" + (", GELU fused" if PostOp.GELU in self.post_ops else "")
        text += f", {self.output.value} output" + (", residual add fused" if PostOp.RESIDUAL_ADD in self.post_ops else "")
        if self.first_tokens is not FirstTokens.NONE:
            text += "; " + _FIRST_TOKENS_TEXT[self.first_tokens]
        if self.merged_with:
            text += f" (one GEMM with the {self.merged_with} other Linear(s) reading this input)"
        return text


@dataclasses.dataclass(frozen=True)
class LoweredLinear:
    node: str
    module_path: str
    kernel: Kernel

    @property
    def is_int8(self) -> bool:
        return self.kernel.is_int8


@dataclasses.dataclass(frozen=True)
class LowerPlan:
    backend: str
    linears: tuple[LoweredLinear, ...]
    activations: int  # quantizers lowered to integer quantize/dequantize
    embeddings: int  # int8 embedding tables
    simulated: tuple[tuple[str, str], ...]  # (tensor, why) quantizers with no integer kernel
    bf16_attention: bool = False  # fused attention behind int8 Q/K/V GEMMs runs in bfloat16

    def summary(self) -> str:
        int8 = sum(1 for lin in self.linears if lin.is_int8)
        kinds: dict[str, int] = {}
        for lin in self.linears:
            text = lin.kernel.describe()
            kinds[text] = kinds.get(text, 0) + 1
        lines = [f"backend {self.backend}: {int8}/{len(self.linears)} Linears on int8 kernels; "
                 f"{self.activations} activation quantizers as integer quantize/dequantize; "
                 f"{self.embeddings} int8 embedding tables"]
        lines += [f"  {n} x {kernel}" for kernel, n in sorted(kinds.items())]
        if self.bf16_attention:
            lines.append("  fused attention whose Q, K, V come straight from int8 GEMMs: in bfloat16")
        if self.simulated:
            lines.append(f"  {len(self.simulated)} quantizers without an integer kernel stay simulated "
                         f"(e.g. {self.simulated[0][0]}: {self.simulated[0][1]})")
        return "\n".join(lines)
