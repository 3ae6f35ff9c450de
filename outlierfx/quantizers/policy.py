"""Quantization policies: which tensors get quantizers, with which spec, and which stay wider.

A policy is data (a frozen dataclass), not code: the observer-placement pass reads it.
"""

from __future__ import annotations

import dataclasses
import re

from ..graph.roles import Role
from ..errors import SettingError
from .spec import MAX_BITS, MIN_BITS, QuantSpec, activation_spec, weight_spec

FULL_ROLES = frozenset({
    Role.LINEAR_INPUT, Role.LINEAR_OUTPUT, Role.NORM_OUTPUT, Role.RESIDUAL_SUM, Role.EMBEDDING_SUM,
    Role.ATTN_SCORES, Role.ATTN_PROBS, Role.ATTN_CONTEXT,
})
LINEAR_INPUT_ROLES = frozenset({Role.LINEAR_INPUT})


@dataclasses.dataclass(frozen=True)
class Override:
    """Tensors with ``role`` use ``spec`` instead of the default (``None``: keep them float)."""

    role: Role
    spec: QuantSpec | None
    reason: str


@dataclasses.dataclass(frozen=True)
class QuantPolicy:
    name: str
    roles: frozenset[Role]
    activation: QuantSpec
    weight: QuantSpec | None
    overrides: tuple[Override, ...] = ()
    quantize_outputs: bool = False  # the model's outputs (logits, hidden states) leave the graph in float
    # Embedding tables: int8 per row (weight-only: a lookup needs no activation scale). They are
    # most of a small encoder's size on disk (MiniLM: 11.7M of 22.7M parameters).
    embedding: QuantSpec | None = dataclasses.field(default_factory=lambda: weight_spec(8))

    def spec_for(self, roles: frozenset[Role]) -> tuple[QuantSpec | None, str | None]:
        """The spec of a tensor with these roles (the widest override wins) and why it differs."""
        chosen = [o for o in self.overrides if o.role in roles]
        if not chosen:
            return self.activation, None
        float_ones = [o for o in chosen if o.spec is None]
        if float_ones:
            return None, float_ones[0].reason
        widest = max(chosen, key=lambda o: o.spec.bits)  # type: ignore[union-attr]
        return widest.spec, widest.reason

    def observed(self, roles: frozenset[Role]) -> bool:
        return bool(roles & self.roles)

    def linear_readers_only(self, roles: frozenset[Role]) -> bool:
        """The tensor is quantized only as a Linear's input, so only Linears read it quantized,
        as on an int8 GEMM backend; its other readers (BERT's post-LN residual shortcut) keep
        the float value."""
        return (roles & self.roles) == {Role.LINEAR_INPUT}

    def with_sink_tokens(self, n: int, min_widening: float = 1.0) -> QuantPolicy:
        """Every activation spec with its first ``n`` token positions on a grid of their own
        (per tensor: only where they widen the range by more than ``min_widening``)."""
        sink = {"sink_tokens": n, "sink_min_widening": min_widening}
        overrides = tuple(o if o.spec is None else dataclasses.replace(o, spec=o.spec.with_(**sink))
                          for o in self.overrides)
        return dataclasses.replace(self, activation=self.activation.with_(**sink), overrides=overrides)


@dataclasses.dataclass(frozen=True)
class BitWidths:
    weights: int
    activations: int

    def __str__(self) -> str:
        return f"W{self.weights}A{self.activations}"


def parse_bits(text: str | int) -> BitWidths:
    """``"W8A8"``, ``"w4a8"`` or ``8`` (same for both)."""
    if isinstance(text, int) or str(text).isdigit():
        widths = BitWidths(int(text), int(text))
    else:
        match = re.fullmatch(r"[wW](\d+)[aA](\d+)", str(text))
        if not match:
            raise SettingError(f"bit widths look like W8A8 (weights and activations) or 8 (both), got {text!r}")
        widths = BitWidths(int(match.group(1)), int(match.group(2)))
    for what, bits in (("weights", widths.weights), ("activations", widths.activations)):
        if not MIN_BITS <= bits <= MAX_BITS:
            raise SettingError(f"{text!r} asks for {bits}-bit {what}; each width must be {MIN_BITS}..{MAX_BITS} bits "
                               f"(e.g. W8A8, W4A8, W8A16)")
    return widths


def make_policy(name: str, bits: BitWidths | str | int = "W8A8") -> QuantPolicy:
    """Named policies: ``full`` (Bondarenko et al.'s quantizer placement), ``linear-inputs``
    (what int8 GEMM backends need: the Linears read their inputs quantized, other readers of
    the same tensor read it in float) and ``mp16`` (full, with FFN input/output and residual
    sums at 16 bit: the paper's W8A{8,16})."""
    bits = bits if isinstance(bits, BitWidths) else parse_bits(bits)
    act, weights = activation_spec(bits.activations), weight_spec(bits.weights)
    # embedding tables: 8 bit below 8-bit weights too (a lookup costs no GEMM, and the tables
    # feed the residual stream directly), as wide as the weights above
    table = weight_spec(max(8, bits.weights))
    if name == "full":
        return QuantPolicy("full", FULL_ROLES, act, weights, embedding=table)
    if name == "linear-inputs":
        return QuantPolicy("linear-inputs", LINEAR_INPUT_ROLES, act, weights, embedding=table)
    if name == "mp16":
        wide = act.with_(bits=16)
        why = "mixed precision W8A{8,16}: outlier-carrying residual-stream tensor kept at 16 bit"
        overrides = tuple(Override(r, wide, why) for r in (Role.FFN_INPUT, Role.FFN_OUTPUT, Role.RESIDUAL_SUM))
        return QuantPolicy("mp16", FULL_ROLES, act, weights, overrides, embedding=table)
    raise SettingError(f"unknown policy {name!r}; choose full, linear-inputs or mp16")
