"""A backend: its capabilities, the kernel each Linear gets there, and how it lowers a graph.

Two decisions go through :meth:`Backend.decide`, so they agree: :meth:`Backend.linear_kernel`
from the quantization specs alone (before calibration: can this recipe run as whole int8
GEMMs here?) and :meth:`Backend.plan` on a calibrated fake-quant graph (the ``Lower`` plan,
which also sees the calibrated grids and the ops around each Linear that a backend fuses).
"""

from __future__ import annotations

import abc
import dataclasses

import torch
import torch.fx

from ..graph import meta
from ..graph.attrs import fetch_attr
from ..graph.ops import OpKind, op_kind
from ..quantizers.observers import FakeQuantize
from ..quantizers.spec import Granularity, QuantSpec
from .capabilities import BackendError, Capabilities, FirstTokens, PostOp
from .grids import InputGrid, fake_quantizer, output_quantizer, two_grids_split, weight_lowers
from .kernel import Fallback, Kernel, KernelKind, LoweredLinear, LowerPlan

# A Linear whose input has more PEG groups than this runs as a float GEMM on the int8 weights
# (its input still quantized per group). Measured on MiniLM, x86, 2 threads: K=3 sub-GEMMs
# 1.54x and K=6 1.89x the per-tensor int8 model (0.575x FP32); the `best` recipe (K=24 on every
# Linear) runs at 6.3x FP32 as sub-GEMMs and 1.7x with max_sub_gemms=4, but the torch.ao
# engines then keep those weights in float (0.62x of FP32 on disk instead of 0.27x): the
# default keeps int8 sub-GEMMs up to 64 groups, per-channel ranges fall back.
MAX_SUB_GEMMS = 64

# Siblings are merged while their stacked int8 weights stay under this many elements: on
# SmolLM2 a merged 576 x 3072 gate/up GEMM ran 2.6x slower than its two halves, a merged
# 576 x 960 Q/K/V 0.65x of its three parts (torch.profiler, 2 threads).
MAX_MERGED_WEIGHT = 1 << 20


class Backend(abc.ABC):
    """One lowering target. Subclasses declare ``name`` and ``capabilities`` and implement
    :meth:`lower`; :meth:`fuse` and :meth:`label_merged` add what their kernels fuse."""

    name: str
    capabilities: Capabilities

    def check_available(self) -> None:
        """Raise :class:`BackendError` if this CPU / torch build cannot run the backend."""

    # -- decisions -------------------------------------------------------------------------------
    def linear_kernel(self, activation: QuantSpec | None, weight: QuantSpec | None, output: QuantSpec | None = None,
                      *, max_sub_gemms: int = MAX_SUB_GEMMS) -> Kernel:
        """The kernel a Linear gets from its specs alone, before calibration.

        ``activation``: the spec of its input quantizer (None: input not quantized); ``weight``:
        its weight spec (None: float weight); ``output``: the spec of a quantizer that is the
        only reader of its output (None: the output stays float). Assumes a first-token grid is
        kept and PEG groups get ``spec.groups`` distinct grids (calibration may merge them: the
        plan then says so); per-channel activations count as too many groups. Fusions that
        depend on the ops around the Linear (GELU, residual add) are decided on the graph only.
        Raises :class:`BackendError` for a weight spec no int8 kernel takes."""
        if weight is None:
            return Kernel.float_gemm(Fallback.WEIGHT_NOT_QUANTIZED)
        if not weight_lowers(weight):
            raise BackendError(f"{self.name}: Linear weights need per-row int8 codes (symmetric of <= 8 bits, "
                               f"asymmetric of <= 7), got {weight.describe()}")
        if activation is None:
            return Kernel.float_gemm(Fallback.INPUT_NOT_QUANTIZED)
        requantized = output is not None and output.granularity is Granularity.PER_TENSOR and output.bits == 8 \
            and not output.signed and not output.sink_tokens
        return self.decide(InputGrid.of_spec(activation), requantized, max_sub_gemms)

    def decide(self, grid: InputGrid, requantized: bool, max_sub_gemms: int) -> Kernel:
        """The kernel for a quantized-weight Linear reading ``grid``; ``requantized``: a plain
        uint8 per-tensor quantizer is the only reader of its output."""
        caps = self.capabilities
        if grid.bits > 8:
            return Kernel.float_gemm(Fallback.INPUT_WIDER_THAN_8_BIT)
        if grid.first_tokens:
            mode = caps.first_token_rows
            runs = grid.groups == 1 and mode is not FirstTokens.NONE and not (requantized and mode.needs_float_output) \
                and not (grid.signed and caps.unsigned_activations_only)
            if not runs:
                return Kernel.float_gemm(Fallback.INPUT_TWO_GRIDS)
            return Kernel(KernelKind.INT8_GEMM, _requantize(requantized), first_tokens=mode)
        if grid.signed and caps.unsigned_activations_only:
            return Kernel.float_gemm(Fallback.SIGNED_INPUT)
        if grid.groups != 1:
            if not caps.peg_sub_gemms:
                return Kernel.float_gemm(Fallback.NO_SUB_GEMMS, grid.groups)
            if grid.groups == 0 or grid.groups > max_sub_gemms:
                return Kernel.float_gemm(Fallback.TOO_MANY_GROUPS, grid.groups)
            return Kernel(KernelKind.INT8_SUB_GEMMS, groups=grid.groups)
        if requantized:
            return Kernel(KernelKind.INT8_GEMM, _requantize(True))
        if not caps.float_output_gemm:
            return Kernel.float_gemm(Fallback.NO_FLOAT_OUTPUT_GEMM)
        return Kernel(KernelKind.INT8_GEMM)

    def simulated_reason(self, module: FakeQuantize) -> str | None:
        """Why this activation quantizer stays simulated in the lowered graph (None: it lowers)."""
        if module.spec.bits > 8:
            return f"{module.spec.bits}-bit: no integer kernel"
        lowers = two_grids_split(module) and not (module.spec.signed and self.capabilities.unsigned_activations_only)
        if module.has_sink_grid and not lowers:
            return f"first {module.spec.sink_tokens} token(s) on a grid of their own (two grids in one tensor)"
        return None

    # -- the plan on a calibrated graph --------------------------------------------------------------
    def plan(self, gm: torch.fx.GraphModule, max_sub_gemms: int = MAX_SUB_GEMMS, bf16_attention: bool = False
             ) -> LowerPlan:
        linears, simulated, activations = [], [], 0
        for node in gm.graph.nodes:
            module = fake_quantizer(gm, node)
            if module is not None and module.enabled:
                reason = self.simulated_reason(module)
                if reason is not None:
                    simulated.append((module.name or node.name, reason))
                else:
                    activations += 1
            if op_kind(node) is OpKind.LINEAR:
                linears.append(LoweredLinear(node.name, meta.module_path(node),
                                             self.plan_linear(gm, node, max_sub_gemms)))
        embeddings = sum(1 for n in gm.graph.nodes if op_kind(n) is OpKind.EMBEDDING and meta.WEIGHT_QUANT in n.meta)
        linears = self.label_merged(gm, linears)
        return LowerPlan(self.name, tuple(linears), activations, embeddings, tuple(simulated), bf16_attention)

    def plan_linear(self, gm: torch.fx.GraphModule, linear: torch.fx.Node, max_sub_gemms: int) -> Kernel:
        if meta.WEIGHT_QUANT not in linear.meta:
            return Kernel.float_gemm(Fallback.WEIGHT_NOT_QUANTIZED)
        module = fake_quantizer(gm, linear.args[0])
        if module is None or not module.enabled:
            return Kernel.float_gemm(Fallback.INPUT_NOT_QUANTIZED)
        kernel = self.decide(InputGrid.of_quantizer(module), output_quantizer(gm, linear) is not None, max_sub_gemms)
        return self.fuse(gm, linear, module, kernel)

    def fuse(self, gm: torch.fx.GraphModule, linear: torch.fx.Node, source: FakeQuantize, kernel: Kernel) -> Kernel:
        """``kernel`` with what this backend fuses from the ops around ``linear`` (none here)."""
        return kernel

    def label_merged(self, gm: torch.fx.GraphModule, linears: list[LoweredLinear]) -> list[LoweredLinear]:
        """The plan's view of the GEMMs this backend merges (none here)."""
        return linears

    # -- lowering -----------------------------------------------------------------------------
    @abc.abstractmethod
    def lower(self, gm: torch.fx.GraphModule, plan: LowerPlan) -> None:
        """Rewrite ``gm`` in place to this backend's kernels, as ``plan`` (from :meth:`plan`) says."""


def _requantize(requantized: bool) -> frozenset[PostOp]:
    return frozenset({PostOp.REQUANTIZE}) if requantized else frozenset()


def label_groups(gm: torch.fx.GraphModule, linears: list[LoweredLinear], nodes: dict[str, torch.fx.Node],
                 groups: dict[torch.fx.Node, list[int]]) -> list[LoweredLinear]:
    """Mark the Linears of each group (indices into ``linears``) as one GEMM, where there are
    several and their weights stay under ``MAX_MERGED_WEIGHT``."""
    for members in groups.values():
        size = sum(fetch_attr(gm, str(nodes[linears[i].node].args[1].target)).numel()
                   if nodes[linears[i].node].args[1].op == "get_attr" else 0 for i in members)
        for i in members if len(members) > 1 and size <= MAX_MERGED_WEIGHT else ():
            kernel = dataclasses.replace(linears[i].kernel, merged_with=len(members) - 1)
            linears[i] = dataclasses.replace(linears[i], kernel=kernel)
    return linears
