"""The reference form: integer quantize/dequantize ops torch runs as they are (``reference``).

Each ``FakeQuantize`` becomes ``quantize -> dequantize`` of torch's ``quantized_decomposed``
library (uint8/int8 codes between them), each quantized Linear weight an int8 tensor behind
``dequantize_per_channel``, each quantized embedding table an int8 table whose gathered rows
are scaled. This is the form inductor's x86 int8 patterns match (:mod:`.inductor`) and the
first stage of every eager engine (:mod:`.ao`, :mod:`.onednn`). A Linear reading a PEG-grouped
activation becomes K sub-GEMMs over contiguous channel groups, each with its own activation
scale, summed in float; the group permutation is folded into the weight columns, so only the
input is gathered, once. Exact up to rounding ties (one quantization step at most per op).

Quantizers wider than 8 bit (the ``mp16`` policy) have no integer kernel and stay simulated.
Quantizers whose first tokens have a grid of their own (``QuantSpec.sink_tokens``) become a
main-grid quantize of the whole tensor plus a quantize of its first rows, and the row-wise ops
after them run on those rows beside the main graph (:mod:`.first_rows`: each Linear one more
int8 GEMM of ``batch x n`` rows).
"""

from __future__ import annotations

import warnings

import torch
import torch.fx

from ..errors import PassError
from ..graph import meta
from ..graph.attrs import del_attr, fetch_attr, set_attr, unique_attr_name
from ..graph.ops import OpKind, op_kind, tensor_val
from ..graph.weight_source import held_codes
from ..quantizers.fake_quant import integer_dtype
from ..quantizers.integer_codes import HeldCodes, integer_weight, kernel_weight_spec
from ..quantizers.observers import FakeQuantize
from ..quantizers.spec import Granularity, QuantSpec
from .base import Backend
from .capabilities import Capabilities, Execution, FirstTokens, PostOp
from .first_rows import FIRST_ROWS_UNREAD, Rows, first_rows_of_value, follow_first_rows
from .grids import (channel_groups, fake_quantizer, first_tokens_of, main_grid, single_grid, sink_grid, two_grids_split,
                    weight_lowers)
from .kernel import KernelKind, LowerPlan

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import torch.ao.quantization.fx._decomposed  # registers the quantized_decomposed ops

qd = torch.ops.quantized_decomposed
aten = torch.ops.aten
Q_TENSOR, DQ_TENSOR = qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default
Q_CHANNEL, DQ_CHANNEL = qd.quantize_per_channel.default, qd.dequantize_per_channel.default
STEP = "Lower"  # the pass new nodes record
NDIM = "outlierfx_lower_ndim"  # rank of a per-channel quantized tensor (the eager stage has no fake shapes)

REFERENCE = Capabilities(
    whole_gemm_granularities=frozenset({Granularity.PER_TENSOR}),
    peg_sub_gemms=True,
    first_token_rows=FirstTokens.SECOND_GEMM,
    unsigned_activations_only=False,
    post_ops=frozenset({PostOp.REQUANTIZE}),  # a quantize right after the GEMM: inductor fuses it
    bf16_attention=False,
    float_output_gemm=True,
    execution=Execution.REFERENCE,
)


class ReferenceBackend(Backend):
    """The decomposed integer form, run by torch as it is (the numerics of every int8 path)."""

    name = "reference"
    capabilities = REFERENCE

    def lower(self, gm: torch.fx.GraphModule, plan: LowerPlan) -> None:
        lower_reference_form(gm, plan)
        split_first_tokens(gm)


def lower_reference_form(gm: torch.fx.GraphModule, plan: LowerPlan) -> None:
    """The reference form, first-token grids left as fake quantizers."""
    ReferenceLowering(gm, {lin.node for lin in plan.linears if lin.kernel.kind is KernelKind.INT8_SUB_GEMMS}).run()


class ReferenceLowering:
    """FakeQuantize -> quantized_decomposed q/dq; int8 weights and embedding tables; a Linear
    named in ``split`` (reading a PEG-grouped input) -> K sub-GEMMs. First-token-grid
    quantizers stay for :func:`split_first_tokens` (reference form) or the eager stage."""

    def __init__(self, gm: torch.fx.GraphModule, split: set[str]) -> None:
        self.gm, self.graph, self.split = gm, gm.graph, split  # names of the Linears to split per PEG group
        self.weights: dict[tuple, tuple[str, str, str, QuantSpec]] = {}  # (memory, shape, spec) -> int8, scale, zp

    def run(self) -> None:
        grouped_inputs: dict[torch.fx.Node, FakeQuantize] = {}
        for node in list(self.graph.nodes):
            module = fake_quantizer(self.gm, node)
            if module is not None:
                dq = self._activation(node, module)
                if dq is not None and not single_grid(module):
                    grouped_inputs[dq] = module
        for node in list(self.graph.nodes):
            if op_kind(node) is OpKind.LINEAR and meta.WEIGHT_QUANT in node.meta:
                source = node.args[0]
                if node.name in self.split and source in grouped_inputs:
                    self._split_linear(node, grouped_inputs[source])
                else:
                    node.update_arg(1, self._weight(node, node.args[1], node.meta[meta.WEIGHT_QUANT]))
            elif op_kind(node) is OpKind.EMBEDDING and meta.WEIGHT_QUANT in node.meta:
                self._embedding(node)
        self.graph.eliminate_dead_code()

    def _buffer(self, base: str, value: torch.Tensor) -> torch.fx.Node:
        name = unique_attr_name(self.gm, base)
        set_attr(self.gm, name, value)
        return self.graph.get_attr(name)

    def _activation(self, node: torch.fx.Node, module: FakeQuantize) -> torch.fx.Node | None:
        x = node.args[0]
        if not module.enabled:
            node.replace_all_uses_with(x)
            self.graph.erase_node(node)
            return None
        spec = module.spec
        if spec.bits > 8 or module.has_sink_grid:  # simulated, or first tokens: done after this stage
            return None
        dtype = integer_dtype(spec)
        with self.graph.inserting_before(node):
            if single_grid(module):  # per tensor, or groups that share one grid (K=1)
                qparams = (*main_grid(module), spec.qmin, spec.qmax, dtype)
                q = self.graph.call_function(Q_TENSOR, (x, *qparams))
                dq = self.graph.call_function(DQ_TENSOR, (q, *qparams))
            else:
                axis = spec.axis % tensor_val(x).dim()
                scale = self._buffer(f"{node.target}_scale", module.scale.float())
                zero_point = self._buffer(f"{node.target}_zero_point", module.zero_point.to(torch.int64))
                qparams = (scale, zero_point, axis, spec.qmin, spec.qmax, dtype)
                q = self.graph.call_function(Q_CHANNEL, (x, *qparams))
                q.meta[NDIM] = tensor_val(x).dim()
                dq = self.graph.call_function(DQ_CHANNEL, (q, *qparams))
        for new in (q, dq):
            meta.inherit(new, node, STEP)
        node.replace_all_uses_with(dq)
        self.graph.erase_node(node)
        del_attr(self.gm, str(node.target))
        return dq

    def _integer_weight(self, target: str, spec: QuantSpec) -> HeldCodes:
        """int8 codes and per-row scales of a weight ConvertToFakeQuant put on the grid: the codes
        a graph captured without weights holds for it (no float weight is read), or those its
        on-grid float weight has (:func:`~outlierfx.quantizers.integer_codes.integer_weight`:
        the scales rebuild the weight bit for bit, so both give the same kernels)."""
        if not weight_lowers(spec):
            raise PassError(f"{target}: lowering needs per-row weights with int8 codes (symmetric of <= 8 bits, "
                            f"asymmetric of <= 7), got {spec.describe()}")
        held = held_codes(self.gm, target)
        if held is None:
            held = integer_weight(fetch_attr(self.gm, target).detach(), spec)
        if held is None:
            raise PassError(f"{target} is not on an int{spec.bits} grid of float32 values; was the graph converted by "
                            f"ConvertToFakeQuant?")
        return held

    def _weight_attrs(self, weight: torch.fx.Node, spec: QuantSpec) -> tuple[str, str, str, QuantSpec]:
        target = str(weight.target)
        # keyed by the tensor (a tied table, lm_head = embedding, may sit under two names), or by
        # the codes held for it (its stand-in, a meta tensor, has no memory to tell it apart)
        tensor = fetch_attr(self.gm, target)
        held = held_codes(self.gm, target)
        key = (id(held), spec) if held is not None else (tensor.data_ptr(), tuple(tensor.shape), spec)
        if key not in self.weights:
            held = self._integer_weight(target, spec)
            names = []
            for suffix, value in (("_int8", held.codes), ("_scale", held.scale),
                                  ("_zero_point", torch.zeros_like(held.scale, dtype=torch.int64))):
                name = unique_attr_name(self.gm, target + suffix)
                set_attr(self.gm, name, value)
                names.append(name)
            self.weights[key] = (*names, kernel_weight_spec(spec))
        return self.weights[key]

    def _dequantized_weight(self, attrs: tuple[str, str, str, QuantSpec], codes: str | None = None) -> torch.fx.Node:
        int8, scale, zero_point, spec = attrs
        args = (self.graph.get_attr(codes or int8), self.graph.get_attr(scale), self.graph.get_attr(zero_point),
                0, spec.qmin, spec.qmax, torch.int8)
        return self.graph.call_function(DQ_CHANNEL, args)

    def _weight(self, linear: torch.fx.Node, weight: torch.fx.Node, spec: QuantSpec) -> torch.fx.Node:
        attrs = self._weight_attrs(weight, spec)
        with self.graph.inserting_before(linear):
            return self._dequantized_weight(attrs)

    def _split_linear(self, linear: torch.fx.Node, module: FakeQuantize) -> None:
        """``x @ W^T`` with x quantized per channel group -> sum over groups of ``x_g @ W_g^T``,
        each ``x_g`` quantized per tensor with its group's parameters."""
        spec: QuantSpec = linear.meta[meta.WEIGHT_QUANT]
        dq = linear.args[0]
        x = dq.args[0].args[0]  # the float tensor before the grouped quantize
        bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
        groups, scales, zero_points = channel_groups(module)
        attrs = self._weight_attrs(linear.args[1], spec)
        codes = fetch_attr(self.gm, attrs[0])
        order = torch.cat(groups)
        act = module.spec
        before = set(self.graph.nodes)
        with self.graph.inserting_before(linear):
            gathered = self.graph.call_function(aten.index_select.default,
                                                (x, -1, self._buffer(f"{linear.name}_channel_order", order)))
            total, start = None, 0
            for g, channels in enumerate(groups):
                end = start + channels.numel()
                part = self.graph.call_function(aten.slice.Tensor, (gathered, -1, start, end))
                qparams = (float(scales[g]), int(zero_points[g]), act.qmin, act.qmax, integer_dtype(act))
                q = self.graph.call_function(Q_TENSOR, (part, *qparams))
                xg = self.graph.call_function(DQ_TENSOR, (q, *qparams))
                columns = unique_attr_name(self.gm, f"{attrs[0]}_group{g}")
                set_attr(self.gm, columns, codes[:, channels].contiguous())
                wg = self._dequantized_weight(attrs, columns)
                out = self.graph.call_function(aten.linear.default, (xg, wg, bias if g == 0 else None))
                out.meta[meta.WEIGHT_QUANT] = spec
                total = out if total is None else self.graph.call_function(aten.add.Tensor, (total, out))
                start = end
        for new in self.graph.nodes:
            if new not in before:
                meta.inherit(new, linear, STEP)  # the sub-GEMMs read as the Linear they replace
        linear.replace_all_uses_with(total)
        self.graph.erase_node(linear)

    def _embedding(self, node: torch.fx.Node) -> None:
        spec: QuantSpec = node.meta[meta.WEIGHT_QUANT]
        weight, indices = node.args[0], node.args[1]
        int8, scale, _, _ = self._weight_attrs(weight, spec)
        with self.graph.inserting_before(node):
            codes = self.graph.call_function(aten.embedding.default, (self.graph.get_attr(int8), indices))
            rows = self.graph.call_function(aten._to_copy.default, (codes,), {"dtype": torch.float32})
            scale_rows = unique_attr_name(self.gm, scale + "_rows")
            set_attr(self.gm, scale_rows, fetch_attr(self.gm, scale)[:, None].contiguous())
            row_scale = self.graph.call_function(aten.embedding.default, (self.graph.get_attr(scale_rows), indices))
            value = self.graph.call_function(aten.mul.Tensor, (rows, row_scale))
        for new in (codes, rows, row_scale, value):
            meta.inherit(new, node, STEP)
        node.replace_all_uses_with(value)
        self.graph.erase_node(node)



def split_first_tokens(gm: torch.fx.GraphModule) -> None:
    """Reference form of the first-token-grid quantizers that stage 1 left simulated: the whole
    tensor on the main grid and its first positions again on theirs, carried through the
    row-wise ops that follow as a pair (:func:`~outlierfx.backends.first_rows.follow_first_rows`),
    so that the main graph keeps inductor's int8 patterns. The first positions are each text's
    first tokens where the quantizer reads the graph's first-token mask (as in the fake-quant
    model); without one, the call's first ``n`` columns whatever its length."""
    graph = gm.graph
    pairs: dict[torch.fx.Node, tuple[torch.fx.Node, Rows]] = {}
    rows_of_mask: dict[tuple[torch.fx.Node | None, int], Rows] = {}  # one column index per mask and n
    for node in list(graph.nodes):
        module = fake_quantizer(gm, node)
        if module is None or not two_grids_split(module):
            continue
        x, spec = node.args[0], module.spec
        main = (*main_grid(module), spec.qmin, spec.qmax, integer_dtype(spec))
        with graph.inserting_before(node):
            q = graph.call_function(Q_TENSOR, (x, *main))
            dq = graph.call_function(DQ_TENSOR, (q, *main))
            created = [q, dq]
            value = tensor_val(x)
            if value is None or value.dim() >= 3:  # FakeQuantize has no first-token grid below rank 3
                n, sink_scale, sink_zero_point = sink_grid(module)
                first_spec = spec.sink_spec()
                first = (sink_scale, sink_zero_point, first_spec.qmin, first_spec.qmax, integer_dtype(first_spec))
                mask = first_tokens_of(node)
                if (mask, n) not in rows_of_mask:
                    rows_of_mask[mask, n] = Rows.of(graph, n, mask)
                rows = rows_of_mask[mask, n]
                head = first_rows_of_value(graph, x, rows)
                q_head = graph.call_function(Q_TENSOR, (head, *first))
                dq_head = graph.call_function(DQ_TENSOR, (q_head, *first))
                created += [head, q_head, dq_head]
                q.meta[FIRST_ROWS_UNREAD] = True
                pairs[dq] = (dq_head, rows)
        for new in created:
            meta.inherit(new, node, STEP)
        if "val" in node.meta:
            dq.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(dq)
        graph.erase_node(node)
        del_attr(gm, str(node.target))
    follow_first_rows(gm, pairs)
