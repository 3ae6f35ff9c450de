"""onednn: oneDNN's int8 GEMM (``onednn::qlinear_pointwise``) called eagerly, with fused post-ops.

The eager stage of :mod:`.eager`, with more in each GEMM: a following GELU (and the quantize
after it, so the next GEMM reads uint8 straight away), or the residual add that reads the
output (a binary post-op); a value read by several Linears (Q, K, V) is quantized once, and
float-output GEMMs reading it become one GEMM over their stacked weights. A Linear reading a
first-token grid runs one GEMM on the two-grid codes, whose first rows are corrected in closed
form, or, where a GELU, a residual add or the requantization to a first-token-grid output is
fused, recomputed by a GEMM of batch x n rows with the same post-ops. With ``bf16_attention``
fused attention behind the Q/K/V GEMMs runs in bfloat16 (:mod:`.bf16_attention`).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx

from ..graph import meta
from ..graph.attrs import unique_attr_name
from ..graph.ops import is_call
from ..quantizers.observers import FakeQuantize
from .ao import AoBackend, engine_capabilities
from .base import MAX_MERGED_WEIGHT, label_groups
from .bf16_attention import use_bf16_attention
from .capabilities import FirstTokens, PostOp
from .eager import LINEAR_MODULE_PREFIX, EagerLowering, first_token_input_lowers
from .grids import (fake_quantizer, first_tokens_of, fusable_gelu, fusable_residual, main_grid, output_quantizer,
                    single_grid, sink_grid)
from .int8_linear import QuantizedLinear
from .kernel import Kernel, KernelKind, LoweredLinear, LowerPlan
from .reference import STEP, lower_reference_form

aten = torch.ops.aten
ONEDNN = engine_capabilities("onednn")


class OnednnBackend(AoBackend):
    """oneDNN's int8 GEMMs in eager mode (the default on x86 CPUs with VNNI or AMX)."""

    def __init__(self) -> None:
        super().__init__("onednn")

    def lower(self, gm: torch.fx.GraphModule, plan: LowerPlan) -> None:
        lower_reference_form(gm, plan)
        OnednnLowering(gm, self, plan.bf16_attention).run()

    def fuse(self, gm: torch.fx.GraphModule, linear: torch.fx.Node, source: FakeQuantize, kernel: Kernel) -> Kernel:
        """What :class:`OnednnLowering` puts into the GEMM: a GELU, the requantization to a
        first-token output grid, or a residual add."""
        if kernel.kind is not KernelKind.INT8_GEMM:
            return kernel
        gelu = fusable_gelu(linear) is not None
        fused = next(iter(linear.users)) if gelu else linear
        with_gelu = frozenset({PostOp.GELU}) if gelu else frozenset()
        if kernel.first_tokens is FirstTokens.CORRECTED:
            post_ops = with_gelu | (frozenset({PostOp.REQUANTIZE}) if sink_output(gm, fused, source) is not None
                                    else frozenset())
            if not post_ops and fusable_residual(linear) is not None:
                post_ops = frozenset({PostOp.RESIDUAL_ADD})
            return dataclasses.replace(kernel, post_ops=post_ops,
                                       first_tokens=FirstTokens.RECOMPUTED if post_ops else FirstTokens.CORRECTED)
        full_range = (source.spec.qmin, source.spec.qmax, source.spec.signed) == (0, 255, False)
        if full_range and sink_output(gm, fused, None) is not None:
            return Kernel(KernelKind.INT8_GEMM, with_gelu | {PostOp.REQUANTIZE}, FirstTokens.OUTPUT_GRID)
        if PostOp.REQUANTIZE in kernel.post_ops:
            return kernel
        if gelu:
            requantized = output_quantizer(gm, fused) is not None
            return Kernel(KernelKind.INT8_GEMM, with_gelu | ({PostOp.REQUANTIZE} if requantized else set()))
        if fusable_residual(linear) is not None:
            return Kernel(KernelKind.INT8_GEMM, frozenset({PostOp.RESIDUAL_ADD}))
        return kernel

    def label_merged(self, gm: torch.fx.GraphModule, linears: list[LoweredLinear]) -> list[LoweredLinear]:
        """The plan's view of :meth:`OnednnLowering._merge_siblings`: float-output int8 GEMMs
        with nothing fused that read the same quantizer run as one."""
        nodes = {n.name: n for n in gm.graph.nodes}
        groups: dict[torch.fx.Node, list[int]] = {}
        for i, lin in enumerate(linears):
            if lin.kernel.kind is KernelKind.INT8_GEMM and not lin.kernel.post_ops:
                groups.setdefault(nodes[lin.node].args[0], []).append(i)
        return label_groups(gm, linears, nodes, groups)


def sink_output(gm: torch.fx.GraphModule, node: torch.fx.Node, source: FakeQuantize | None) -> torch.fx.Node | None:
    """The first-token-grid quantizer that is the only reader of ``node`` (a Linear, or the
    GELU after it) when onednn can requantize to it: 8-bit unsigned full range, as many first
    tokens as ``source`` (the Linear's input quantizer, if it has a first-token grid), and read
    only by Linears that lower with it as their input. Those then read the two-grid codes as
    they are."""
    if len(node.users) != 1:
        return None
    quantizer = next(iter(node.users))
    module = fake_quantizer(gm, quantizer)
    if module is None or not module.enabled or not module.has_sink_grid or not single_grid(module):
        return None
    spec = module.spec
    tokens = spec.sink_tokens if source is None else source.spec.sink_tokens
    if (spec.qmin, spec.qmax, spec.signed, spec.sink_tokens) != (0, 255, False, tokens):
        return None
    readers = list(quantizer.users)
    lowers = all(is_call(r, aten.linear.default) and r.args[0] is quantizer and meta.WEIGHT_QUANT in r.meta
                 and first_token_input_lowers(gm, r, module, ONEDNN) for r in readers)
    return quantizer if readers and lowers else None


def _mergeable(module: QuantizedLinear) -> bool:
    """A GEMM with a float output and nothing fused after it (see ``_merge_siblings``)."""
    return module.out_qparams is None and module.gelu is None and not module.residual


class OnednnLowering(EagerLowering):
    """:class:`EagerLowering` with oneDNN's fusions, shared codes, merged GEMMs and bf16 attention."""

    reads_shared_codes = True

    def __init__(self, gm: torch.fx.GraphModule, backend: OnednnBackend, bf16_attention: bool) -> None:
        super().__init__(gm, backend.name, backend.capabilities)
        self.bf16_attention = bf16_attention

    def merge_gemms(self) -> None:
        self._merge_siblings()

    def finish(self) -> None:
        for node in list(self.graph.nodes):
            self._plain_codes(node)
        if self.bf16_attention:
            use_bf16_attention(self.gm)

    def _sink_output(self, linear: torch.fx.Node, gelu: str | None) -> torch.fx.Node | None:
        """The first-token-grid quantizer that a single-grid GEMM can requantize to."""
        if self._uint8_value(linear.args[0]) is None:
            return None
        return sink_output(self.gm, next(iter(linear.users)) if gelu is not None else linear, None)

    def _sink_linear(self, linear: torch.fx.Node, module: FakeQuantize, w_dq: torch.fx.Node, bias: object) -> None:
        """One GEMM on two-grid uint8 codes (made once for every Linear that reads the value)
        and a small one for the first tokens' rows; a following GELU, the residual add, and the
        requantization to a first-token-grid output that only such Linears read go into both."""
        qparams = (*main_grid(module), module.spec.qmin, module.spec.qmax)
        sink = sink_grid(module)
        quantizer = linear.args[0]
        gelu = fusable_gelu(linear)
        out_node = sink_output(self.gm, next(iter(linear.users)) if gelu is not None else linear, module)
        out = sink_out = None
        if out_node is not None:
            target = self.gm.get_submodule(str(out_node.target))
            out, sink_out = main_grid(target), sink_grid(target)
        residual = self._residual(linear) if gelu is None and out is None else None
        call = self._replace_linear(linear, w_dq, bias, qparams, out, gelu, self._two_grid_codes(quantizer, qparams, sink),
                                    sink, residual, sink_out, first_tokens_of(quantizer))
        if out_node is not None:
            self.two_grid[out_node] = call

    def _merge_siblings(self) -> None:
        """Float-output GEMMs with nothing fused that read the same int8 value (Q, K and V; a
        gate and up projection) become one GEMM over their stacked weights, its output split
        (views) among their readers: one call and, with first-token grids, one correction
        instead of several."""
        groups: dict[tuple, list[torch.fx.Node]] = {}
        for node in self.graph.nodes:
            module = self.gm.get_submodule(str(node.target)) if node.op == "call_module" else None
            if isinstance(module, QuantizedLinear) and _mergeable(module) and len(node.args) == 1:
                key = (node.args[0], node.kwargs.get("first_tokens"), module.in_scale, module.in_zero_point,
                       module.in_qmin, module.in_qmax, module.sink)
                groups.setdefault(key, []).append(node)
        for nodes in groups.values():
            modules = [self.gm.get_submodule(str(n.target)) for n in nodes]
            if len(nodes) < 2 or sum(m.out_features * m.in_features for m in modules) > MAX_MERGED_WEIGHT:
                continue
            first = modules[0]
            biases = [m.bias if m.bias is not None else torch.zeros(m.out_features) for m in modules]
            # the parts' int8 rows as they are (no stacked copy): stacked only to be packed
            merged = QuantizedLinear([b for m in modules for b in m.weight_blocks()],
                                     torch.cat([m.weight_scale for m in modules]),
                                     torch.cat(biases), (first.in_scale, first.in_zero_point, first.in_qmin, first.in_qmax),
                                     None, self.engine, sink=first.sink)
            name = unique_attr_name(self.gm, LINEAR_MODULE_PREFIX + "merged_" + nodes[0].name)
            self.gm.add_module(name, merged)
            with self.graph.inserting_before(nodes[0]):
                call = self.graph.call_module(name, nodes[0].args, nodes[0].kwargs)
                split = self.graph.call_function(torch.split, (call, [m.out_features for m in modules], -1))
                parts = [self.graph.call_function(operator.getitem, (split, i)) for i in range(len(nodes))]
            meta.inherit(call, nodes[0], STEP)
            for node, part in zip(nodes, parts):
                meta.inherit(part, node, STEP)
                node.replace_all_uses_with(part)
                target = str(node.target)
                self.graph.erase_node(node)
                self.gm.delete_submodule(target)

    def _plain_codes(self, node: torch.fx.Node) -> None:
        """An onednn GEMM whose requantized output only onednn GEMMs read hands them the uint8
        codes as they are (no quint8 wrapper, which copies them: 0.1 ms per MiniLM FFN)."""
        module = self.gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if not (isinstance(module, QuantizedLinear) and module.engine == "onednn" and module.out_qparams):
            return
        readers = [self.gm.get_submodule(str(u.target)) if u.op == "call_module" else None for u in node.users]
        if node.users and all(isinstance(r, QuantizedLinear) and r.engine == "onednn" and u.args[0] is node
                              and node not in u.args[1:] for r, u in zip(readers, node.users)):
            module.codes_out = True
