"""What lowering reads off a calibrated fake-quant graph: quantizer grids and fusable neighbours.

:class:`InputGrid` is the part of an activation quantizer that decides a Linear's kernel. It is
built from a calibrated :class:`FakeQuantize` (the Lower plan) or from a bare
:class:`QuantSpec` (before calibration, :meth:`~outlierfx.backends.base.Backend.linear_kernel`), so both decisions go
through the same code.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from ..graph.attrs import set_attr, unique_attr_name
from ..graph.ops import is_call, tensor_val
from ..quantizers.integer_codes import kernel_weight_spec
from ..quantizers.observers import FakeQuantize
from ..quantizers.spec import Granularity, QuantSpec

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class InputGrid:
    """An activation grid as the kernels see it. ``groups``: 1 for one grid over every channel
    (per tensor, or PEG groups that share one), K for K distinct channel groups, 0 for one per
    channel before calibration (count unknown). ``first_tokens``: positions with a grid of
    their own (0: none)."""

    bits: int
    signed: bool
    groups: int
    first_tokens: int

    @classmethod
    def of_spec(cls, spec: QuantSpec) -> InputGrid:
        groups = {Granularity.PER_TENSOR: 1, Granularity.PER_GROUP: spec.groups, Granularity.PER_CHANNEL: 0}
        return cls(spec.bits, bool(spec.signed), groups[spec.granularity], spec.sink_tokens)

    @classmethod
    def of_quantizer(cls, module: FakeQuantize) -> InputGrid:
        groups = 1 if single_grid(module) else len(channel_groups(module)[0])
        first_tokens = module.spec.sink_tokens if module.has_sink_grid else 0
        return cls(module.spec.bits, bool(module.spec.signed), groups, first_tokens)


def fake_quantizer(gm: torch.fx.GraphModule, node: object) -> FakeQuantize | None:
    if not isinstance(node, torch.fx.Node) or node.op != "call_module":
        return None
    module = gm.get_submodule(str(node.target))
    return module if isinstance(module, FakeQuantize) else None


def single_grid(module: FakeQuantize) -> bool:
    """Whether every channel uses the same scale and zero point (per tensor, or PEG with K=1):
    then it lowers as a per-tensor quantizer, with int8 kernels end to end."""
    if module.spec.granularity is Granularity.PER_TENSOR:
        return True
    return bool((module.scale == module.scale.flatten()[0]).all() and
                (module.zero_point == module.zero_point.flatten()[0]).all())


def channel_groups(module: FakeQuantize) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The channel groups of a grouped quantizer (channels sharing scale and zero point, in
    channel order), with each group's scale and zero point."""
    pairs = torch.stack([module.scale.double(), module.zero_point.double()], 1)
    unique, inverse = torch.unique(pairs, dim=0, return_inverse=True)
    groups = [torch.nonzero(inverse == g).flatten() for g in range(unique.shape[0])]
    return groups, unique[:, 0].float(), unique[:, 1].to(torch.int64)


def main_grid(module: FakeQuantize) -> tuple[float, int]:
    """(scale, zero point) of a single-grid quantizer (per tensor, or PEG groups that share one)."""
    return float(module.scale.flatten()[0]), int(module.zero_point.flatten()[0])


def first_tokens_of(quantizer: torch.fx.Node) -> torch.fx.Node | None:
    """The graph's first-token mask a first-token-grid quantizer node reads (``args[1]``, wired by
    :func:`~outlierfx.graph.first_tokens.wire_first_tokens`), or None: its kernels then take the
    first columns of a call."""
    return quantizer.args[1] if len(quantizer.args) > 1 else None  # type: ignore[return-value]


def sink_grid(module: FakeQuantize) -> tuple[int, float, int]:
    """(first tokens, scale, zero point) of a quantizer's first-token grid."""
    return module.spec.sink_tokens, float(module.sink_scale), int(module.sink_zero_point)


def weight_lowers(spec: QuantSpec) -> bool:
    """Whether a Linear weight spec has int8 codes the kernels take: per output row, symmetric of
    at most 8 bits (what the policies' weight specs are) or asymmetric of at most 7
    (:func:`~outlierfx.quantizers.integer_codes.kernel_weight_spec`)."""
    return spec.granularity is Granularity.PER_CHANNEL and spec.axis % 2 == 0 and kernel_weight_spec(spec).bits <= 8


def two_grids_split(module: FakeQuantize) -> bool:
    """Whether a first-token-grid quantizer lowers as two per-tensor grids (at most 8 bit, one
    grid per part): quantize/dequantize pairs in the reference form, uint8 codes (if unsigned)
    on the eager engines."""
    return module.has_sink_grid and module.spec.bits <= 8 and single_grid(module)


def output_quantizer(gm: torch.fx.GraphModule, node: torch.fx.Node) -> FakeQuantize | None:
    """The full-range uint8 per-tensor quantizer that is the only reader of ``node``, if any."""
    if len(node.users) != 1:
        return None
    module = fake_quantizer(gm, next(iter(node.users)))
    if module is None or not module.enabled or not single_grid(module) or module.has_sink_grid:
        return None
    if module.spec.signed or module.spec.bits != 8:
        return None
    return module


def fusable_gelu(linear: torch.fx.Node) -> str | None:
    """The approximation (``"none"``/``"tanh"``) of the GELU that is the only reader of ``linear``."""
    if len(linear.users) != 1:
        return None
    gelu = next(iter(linear.users))
    if not is_call(gelu, aten.gelu.default) or len(gelu.args) != 1:
        return None
    approximate = gelu.kwargs.get("approximate", "none")
    return approximate if approximate in ("none", "tanh") else None


def fusable_residual(linear: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """``(add, other)`` when ``linear``'s only reader is ``add(linear, other)`` (either order):
    the residual connection after an attention output or FFN projection, which oneDNN adds
    inside the GEMM. Where the recorded shapes show a broadcast or another dtype, no; where
    there are none (the eager stage runs on a copy without them), :class:`~outlierfx.backends.int8_linear.QuantizedLinear`
    checks at run time and adds outside the kernel if it must."""
    if len(linear.users) != 1:
        return None
    add = next(iter(linear.users))
    if not is_call(add, aten.add.Tensor) or len(add.args) != 2 or add.kwargs:
        return None
    others = [a for a in add.args if a is not linear]
    if len(others) != 1 or not isinstance(others[0], torch.fx.Node):
        return None
    values = [tensor_val(n) for n in (linear, others[0], add)]
    if all(v is not None for v in values) and not all(
            v.shape == values[0].shape and v.dtype == torch.float32 for v in values):  # type: ignore[union-attr]
        return None
    return add, others[0]


def add_constant(gm: torch.fx.GraphModule, base: str, value: torch.Tensor) -> str:
    """Register ``value`` under a fresh name derived from ``base``; return the name."""
    name = unique_attr_name(gm, base)
    set_attr(gm, name, value)
    return name
