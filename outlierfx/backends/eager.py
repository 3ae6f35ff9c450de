"""The eager int8 engines' second stage: the reference form -> packed int8 kernels.

Quantized values flow as ``quint8`` tensors (or plain uint8 codes) between the ops the engines
run in int8 (Linear, add, layer_norm), with the requantization to the next quantizer's grid
fused into each kernel (:class:`~.int8_linear.QuantizedLinear`); float ops read a dequantized
copy, made once per value (:mod:`.eager_values`). A Linear whose output stays float uses the
engine's float-output int8 GEMM, where it has one (else it stays a float GEMM, listed in the
plan). A first-token-grid quantizer becomes two-grid uint8 codes
(:func:`~.runtime.two_grid_codes`); a float-output Linear reading it runs in int8 (here two
GEMMs; :mod:`.onednn` does one and corrects the first rows), other readers get the codes
dequantized. :class:`EagerLowering` is the torch.ao engines' stage; onednn extends it.
"""

from __future__ import annotations

import torch
import torch.fx

from ..graph import meta
from ..graph.attrs import fetch_attr, unique_attr_name
from ..graph.ops import is_call
from ..quantizers.observers import FakeQuantize
from .capabilities import Capabilities, PostOp
from .eager_values import constant_weight, float_view, scale_in_place, skip_zero_masks
from .grids import (fake_quantizer, first_tokens_of, fusable_gelu, fusable_residual, main_grid, output_quantizer, sink_grid,
                    two_grids_split)
from .int8_linear import QuantizedLinear
from .reference import DQ_CHANNEL, DQ_TENSOR, Q_TENSOR, STEP
from .runtime import two_grid_codes, two_grid_dequantize

aten = torch.ops.aten
LINEAR_MODULE_PREFIX = "outlierfx_int8_linear_"


def first_token_input_lowers(gm: torch.fx.GraphModule, linear: torch.fx.Node, module: FakeQuantize,
                             caps: Capabilities) -> bool:
    """Whether a Linear reading first-token-grid quantizer ``module`` runs in int8 on an eager
    engine (x86/fbgemm: two GEMMs; onednn: one GEMM and a correction of the first rows): an
    unsigned, at most 8-bit, per-tensor main grid, and a float output on an engine that has one."""
    return module.enabled and two_grids_split(module) and not module.spec.signed and caps.float_output_gemm \
        and output_quantizer(gm, linear) is None


class EagerLowering:
    """The eager stage on ``gm`` (already in reference form) for engine ``engine`` with ``caps``."""

    reads_shared_codes = False  # onednn: a value read by several GEMMs (Q, K, V) is quantized once for all

    def __init__(self, gm: torch.fx.GraphModule, engine: str, caps: Capabilities) -> None:
        self.gm, self.graph, self.engine, self.caps = gm, gm.graph, engine, caps
        self.quantized: dict[torch.fx.Node, torch.fx.Node] = {}  # q node -> node giving its quint8 tensor
        self.two_grid: dict[torch.fx.Node, torch.fx.Node] = {}  # first-token-grid quantizer -> its uint8 codes
        # per-row weight scales in the float64 the engines take, one tensor per source: the K
        # sub-GEMMs of a PEG-split Linear share their rows' scales (and one copy on disk)
        self.row_scales: dict[int, torch.Tensor] = {}

    def run(self) -> None:
        for node in list(self.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target is aten.linear.default:
                self._linear(node)
            elif node.target in (aten.add.Tensor, aten.layer_norm.default):
                self._elementwise(node)
        for node in list(self.graph.nodes):  # after the Linears: what still reads a two-grid quantizer
            self._two_grid_values(node)
        for node in list(self.graph.nodes):
            if node.op == "call_function" and node.target in (DQ_TENSOR, DQ_CHANNEL) and node.args[0].op != "get_attr":
                float_view(self.gm, node, self.quantized)
        # the weights the int8 GEMMs took are read by dead dequantize nodes now: dequantized
        # below as float fallbacks, they cost 4x the int8 weights until the end (+530 MB on SmolLM2)
        self.graph.eliminate_dead_code()
        for node in list(self.graph.nodes):  # weights of float fallbacks: dequantized once, now
            if node.op == "call_function" and node.target is DQ_CHANNEL and node.args[0].op == "get_attr":
                constant_weight(self.gm, node)
        self.graph.eliminate_dead_code()
        self.merge_gemms()
        for node in list(self.graph.nodes):
            scale_in_place(self.gm, node)
        skip_zero_masks(self.gm)
        self.finish()

    def merge_gemms(self) -> None:
        """Hook: merge GEMMs that read one value (onednn)."""

    def finish(self) -> None:
        """Hook: last rewrites on the lowered graph (onednn: plain codes, bf16 attention)."""

    # -- int8 values ---------------------------------------------------------------------------
    @staticmethod
    def _uint8_value(node: object) -> torch.fx.Node | None:
        """The full-range uint8 per-tensor quantize node behind a dequantize node."""
        if is_call(node, DQ_TENSOR) and is_call(node.args[0], Q_TENSOR) \
                and tuple(node.args[0].args[3:6]) == (0, 255, torch.uint8):
            return node.args[0]
        return None

    @staticmethod
    def _output_value(node: torch.fx.Node) -> torch.fx.Node | None:
        """The full-range uint8 quantize node that is the only reader of ``node``."""
        if len(node.users) != 1:
            return None
        q = next(iter(node.users))
        return q if is_call(q, Q_TENSOR) and tuple(q.args[3:6]) == (0, 255, torch.uint8) else None

    def _quint8(self, q: torch.fx.Node) -> torch.fx.Node:
        """The quint8 tensor of value ``q``: the int8 op that produced it, or one quantize."""
        if q not in self.quantized:
            with self.graph.inserting_after(q):
                node = self.graph.call_function(torch.quantize_per_tensor, (q.args[0], q.args[1], q.args[2], torch.quint8))
            meta.inherit(node, q, STEP)
            self.quantized[q] = node
        return self.quantized[q]

    def _linear(self, linear: torch.fx.Node) -> None:
        x_dq, w_dq = linear.args[0], linear.args[1]
        bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
        sink = fake_quantizer(self.gm, x_dq)
        if sink is not None and first_token_input_lowers(self.gm, linear, sink, self.caps) \
                and self._output_value(linear) is None and is_call(w_dq, DQ_CHANNEL) and w_dq.args[0].op == "get_attr":
            self._sink_linear(linear, sink, w_dq, bias)
            return
        if not (is_call(x_dq, DQ_TENSOR) and is_call(x_dq.args[0], Q_TENSOR) and is_call(w_dq, DQ_CHANNEL)):
            return
        q_x = x_dq.args[0]
        scale, zero_point, qmin, qmax, dtype = q_x.args[1:6]
        if dtype != torch.uint8 or w_dq.args[0].op != "get_attr":
            return
        q_out = self._output_value(linear)
        gelu = fusable_gelu(linear) if q_out is None and PostOp.GELU in self.caps.post_ops else None
        if gelu is not None:  # Linear -> GELU -> quantize: GELU and requantization both in the GEMM
            q_out = self._output_value(next(iter(linear.users)))
        sink_node = self._sink_output(linear, gelu) if q_out is None else None
        if sink_node is not None:  # requantized to a first-token-grid output (MiniLM's GELU outputs)
            target = self.gm.get_submodule(str(sink_node.target))
            self.two_grid[sink_node] = self._replace_linear(
                linear, w_dq, bias, (scale, zero_point, qmin, qmax), main_grid(target), gelu, self._quint8(q_x),
                sink_out=sink_grid(target), first_tokens=first_tokens_of(sink_node))
            return
        if q_out is None and not self.caps.float_output_gemm:
            return  # float fallback (listed in the plan)
        out = None if q_out is None else (q_out.args[1], q_out.args[2])
        residual = self._residual(linear) if out is None and gelu is None else None
        full_range = self._uint8_value(x_dq) is not None
        if full_range and (out is not None or self.reads_shared_codes):
            source = self._quint8(q_x)  # int8 in
        else:
            source = q_x.args[0]  # the float input, quantized inside the kernel
        call = self._replace_linear(linear, w_dq, bias, (scale, zero_point, qmin, qmax), out, gelu, source,
                                    residual=residual)
        if q_out is not None:
            self.quantized[q_out] = call

    def _sink_output(self, linear: torch.fx.Node, gelu: str | None) -> torch.fx.Node | None:
        """The first-token-grid quantizer a single-grid GEMM requantizes to (onednn only)."""
        return None

    def _sink_linear(self, linear: torch.fx.Node, module: FakeQuantize, w_dq: torch.fx.Node, bias: object) -> None:
        """A Linear whose input quantizer gives the first tokens their own grid: two GEMMs on the
        float input, one per grid."""
        qparams = (*main_grid(module), module.spec.qmin, module.spec.qmax)
        quantizer = linear.args[0]
        self._replace_linear(linear, w_dq, bias, qparams, None, None, quantizer.args[0], sink_grid(module),
                             self._residual(linear), first_tokens=first_tokens_of(quantizer))

    def _two_grid_values(self, node: torch.fx.Node) -> None:
        """A first-token-grid quantizer that ops other than int8 GEMMs still read (a post-LN
        residual add): they read its codes dequantized, made once (or taken from the GEMM that
        produced them)."""
        module = fake_quantizer(self.gm, node)
        if module is None or not module.enabled or not node.users or not two_grids_split(module) or module.spec.signed:
            return
        (scale, zero_point), sink = main_grid(module), sink_grid(module)
        codes = self._two_grid_codes(node, (scale, zero_point, module.spec.qmin, module.spec.qmax), sink)
        with self.graph.inserting_after(codes):
            values = self.graph.call_function(two_grid_dequantize, (codes, sink[0], scale, zero_point, *sink[1:],
                                                                    first_tokens_of(node)))
        meta.inherit(values, node, STEP)
        node.replace_all_uses_with(values)

    def _two_grid_codes(self, quantizer: torch.fx.Node, qparams: tuple, sink: tuple[int, float, int]) -> torch.fx.Node:
        """The uint8 codes of a first-token-grid quantizer's value: the int8 GEMM that produced
        them, or one :func:`two_grid_codes` call shared by its readers."""
        if quantizer not in self.two_grid:
            scale, zero_point, qmin, qmax = qparams
            with self.graph.inserting_after(quantizer):
                node = self.graph.call_function(two_grid_codes, (quantizer.args[0], sink[0], scale, zero_point,
                                                                 sink[1], sink[2], qmin, qmax, first_tokens_of(quantizer)))
            meta.inherit(node, quantizer, STEP)
            self.two_grid[quantizer] = node
        return self.two_grid[quantizer]

    def _residual(self, linear: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
        return fusable_residual(linear) if PostOp.RESIDUAL_ADD in self.caps.post_ops else None

    def _replace_linear(self, linear: torch.fx.Node, w_dq: torch.fx.Node, bias: object,
                        in_qparams: tuple, out: tuple | None, gelu: str | None, source: torch.fx.Node,
                        sink: tuple[int, float, int] | None = None,
                        residual: tuple[torch.fx.Node, torch.fx.Node] | None = None,
                        sink_out: tuple[int, float, int] | None = None,
                        first_tokens: torch.fx.Node | None = None) -> torch.fx.Node:
        """Put a :class:`QuantizedLinear` reading ``source`` in place of ``linear`` (and of the
        GELU, or the residual ``(add, other)``, fused into it); ``first_tokens``: the graph's
        first-token mask its first-token grids read."""
        codes = fetch_attr(self.gm, str(w_dq.args[0].target))
        w_scale = fetch_attr(self.gm, str(w_dq.args[1].target))
        w_scale = self.row_scales.setdefault(w_scale.data_ptr(), w_scale.detach().double())
        bias_value = fetch_attr(self.gm, str(bias.target)) if isinstance(bias, torch.fx.Node) else None
        module = QuantizedLinear(codes, w_scale, bias_value, in_qparams, out, self.engine, gelu, sink,
                                 residual=residual is not None, sink_out=sink_out)
        name = unique_attr_name(self.gm, LINEAR_MODULE_PREFIX + linear.name)
        self.gm.add_module(name, module)
        # after ``other`` too: the add's position (``linear`` precedes it)
        with self.graph.inserting_before(linear if residual is None else residual[0]):
            call = self.graph.call_module(name, (source,) if residual is None else (source, residual[1]),
                                          {} if first_tokens is None else {"first_tokens": first_tokens})
        meta.inherit(call, linear, STEP)
        if residual is not None:
            residual[0].replace_all_uses_with(call)
            self.graph.erase_node(residual[0])
        if out is None:  # with a requantized output the quantize node stands for the value and goes later
            if gelu is not None:
                fused = next(iter(linear.users))
                fused.replace_all_uses_with(call)
                self.graph.erase_node(fused)
            linear.replace_all_uses_with(call)
        return call

    def _elementwise(self, node: torch.fx.Node) -> None:
        """add / layer_norm with int8 inputs and an int8 output -> torch.ao's quantized kernel."""
        q_out = self._output_value(node)
        if q_out is None:
            return
        if node.target is aten.add.Tensor:
            if len(node.args) != 2 or node.kwargs:
                return
            inputs = [self._uint8_value(a) for a in node.args]
            if any(q is None for q in inputs):
                return
            args = (*(self._quint8(q) for q in inputs), q_out.args[1], q_out.args[2])
            target = torch.ops.quantized.add.default
        else:
            q_in = self._uint8_value(node.args[0])
            if q_in is None:
                return
            args = list(node.args) + [None] * (5 - len(node.args))
            shape, weight, bias = args[1], args[2], args[3]
            eps = args[4] if args[4] is not None else node.kwargs.get("eps", 1e-5)
            args = (self._quint8(q_in), shape, weight, bias, eps, q_out.args[1], q_out.args[2])
            target = torch.ops.quantized.layer_norm.default
        with self.graph.inserting_before(node):
            call = self.graph.call_function(target, args)
        meta.inherit(call, node, STEP)
        self.quantized[q_out] = call
