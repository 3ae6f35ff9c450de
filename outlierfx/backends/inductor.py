"""Inductor: the reference int8 form compiled by torch.compile (the non-deprecated int8 path).

torch 2.13 deprecates quantized tensors (the torch.ao engines). Inductor instead pattern-matches
``dequantize -> linear -> quantize`` in the ``quantized_decomposed`` form of
:mod:`.reference` into fused oneDNN int8 kernels (``onednn.qlinear_pointwise``) when weights
are frozen as constants, and fuses the remaining quantize/dequantize ops into the neighbouring
elementwise kernels. Lowering for inductor adds two rewrites to the reference form: readers of
a quantized value that are not Linears get their own quantize/dequantize pair (the GEMM
patterns then take the shared one), and Q/K/V GEMMs that feed nothing but fused attention
become one GEMM; with ``bf16_attention`` those write bfloat16 (:mod:`.bf16_attention`).

A custom ``torch.compile(backend=...)`` cannot do this: inductor decides which weights are
frozen constants while dynamo traces, before a backend function runs, so the int8 weight
prepacking fails on weights that arrive as graph inputs (measured with torch 2.13).
:class:`CompiledInt8` compiles with freezing on; ``outlierfx.passes.lower.compile_int8`` lowers
and compiles a fake-quant model in one call.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch._inductor.config
import torch.fx

from ..graph import meta
from ..graph.attrs import fetch_attr
from ..graph.copy import copy_graph_module
from ..graph.hadamard_op import HADAMARD, rotate_last_axis
from ..graph.ops import SDPA, is_call
from .base import MAX_MERGED_WEIGHT, label_groups
from .bf16_attention import read_by_attention_only, use_bf16_attention_in_reference_form
from .capabilities import Execution, FirstTokens
from .grids import add_constant
from .kernel import KernelKind, LoweredLinear, LowerPlan
from .reference import DQ_CHANNEL, DQ_TENSOR, Q_TENSOR, REFERENCE, STEP, ReferenceBackend, qd

aten = torch.ops.aten
INDUCTOR_OPTIONS = {"freezing": True}  # weights as constants: what the int8 GEMM patterns need
INDUCTOR = dataclasses.replace(REFERENCE, bf16_attention=True, execution=Execution.COMPILED)


class InductorBackend(ReferenceBackend):
    """The reference form shaped for inductor's int8 patterns; compile it with :class:`CompiledInt8`."""

    name = "inductor"
    capabilities = INDUCTOR

    def lower(self, gm: torch.fx.GraphModule, plan: LowerPlan) -> None:
        super().lower(gm, plan)
        _separate_float_readers(gm)
        _own_weight_per_gemm(gm)
        _merge_attention_gemms(gm)
        if plan.bf16_attention:
            use_bf16_attention_in_reference_form(gm)

    def label_merged(self, gm: torch.fx.GraphModule, linears: list[LoweredLinear]) -> list[LoweredLinear]:
        """The plan's view of :func:`_merge_attention_gemms`: plain float-output int8 GEMMs that
        read the same quantizer and feed only fused attention, while their stacked weights stay
        under ``MAX_MERGED_WEIGHT`` (none with first-row GEMMs, which share their weights)."""
        nodes = {n.name: n for n in gm.graph.nodes}
        attention = {n for n in gm.graph.nodes if is_call(n, SDPA)}
        groups: dict[torch.fx.Node, list[int]] = {}
        for i, lin in enumerate(linears):
            kernel = lin.kernel
            plain = kernel.kind is KernelKind.INT8_GEMM and not kernel.post_ops \
                and kernel.first_tokens is FirstTokens.NONE
            if plain and read_by_attention_only(nodes[lin.node], attention):
                groups.setdefault(nodes[lin.node].args[0], []).append(i)
        return label_groups(gm, linears, nodes, groups)


def _separate_float_readers(gm: torch.fx.GraphModule) -> None:
    """Give the non-Linear readers of a quantized value their own quantize/dequantize pair.

    Inductor's int8 GEMM patterns take a ``dequantize`` shared by several Linears (Q, K, V)
    only if every reader is a Linear; a post-LN norm output is also read by the residual add.
    The second pair uses the ``.tensor`` overloads so that common-subexpression elimination
    does not merge it back. Values are unchanged; inductor fuses the extra quantize."""
    for dq in list(gm.graph.nodes):
        if not is_call(dq, DQ_TENSOR) or not is_call(dq.args[0], Q_TENSOR):
            continue
        readers = list(dq.users)
        others = [u for u in readers if not is_call(u, aten.linear.default)]
        if not others or len(others) == len(readers):
            continue
        q = dq.args[0]
        x, scale, zero_point, *rest = q.args
        with gm.graph.inserting_before(dq.next):  # in order, right after dq
            scale_node = gm.graph.get_attr(add_constant(gm, f"{q.name}_scale", torch.tensor(scale, dtype=torch.float64)))
            zp_node = gm.graph.get_attr(add_constant(gm, f"{q.name}_zero_point", torch.tensor(zero_point)))
            q2 = gm.graph.call_function(qd.quantize_per_tensor.tensor, (x, scale_node, zp_node, *rest))
            dq2 = gm.graph.call_function(qd.dequantize_per_tensor.tensor, (q2, scale_node, zp_node, *rest))
        for new in (q2, dq2):
            meta.inherit(new, dq, STEP)
        for user in others:
            user.replace_input_with(dq, dq2)


def _own_weight_per_gemm(gm: torch.fx.GraphModule) -> None:
    """Give each int8 GEMM a weight dequantize that no other GEMM reads.

    Inductor prepacks a weight into an int8 GEMM only where its dequantize has one reader, and
    common-subexpression elimination merges identical dequantizes: where one int8 weight feeds
    several GEMMs (ALBERT shares its layers' weights), every one of them ran as a float GEMM (6
    of the tiny ALBERT's 10, architecture matrix). The second and later readers get a copy of the
    int8 codes, so memory is that of an unshared model's int8 weights. The first-row GEMMs of
    :mod:`.first_rows` keep sharing: their dequantize differs in an argument, CSE keeps it apart."""
    seen: set[tuple] = set()
    for linear in list(gm.graph.nodes):
        dq = linear.args[1] if is_call(linear, aten.linear.default) else None
        if not is_call(dq, DQ_CHANNEL) or not isinstance(dq.args[0], torch.fx.Node) or dq.args[0].op != "get_attr":
            continue
        key = tuple(str(a.target) if isinstance(a, torch.fx.Node) else a for a in dq.args)
        if key not in seen:
            seen.add(key)
            continue
        codes = fetch_attr(gm, str(dq.args[0].target))
        with gm.graph.inserting_before(linear):
            copy = gm.graph.get_attr(add_constant(gm, f"{dq.args[0].target}_copy", codes.clone()))
            own = gm.graph.call_function(DQ_CHANNEL, (copy, *dq.args[1:]))
        meta.inherit(own, dq, STEP)
        linear.replace_input_with(dq, own)
        if not dq.users:
            gm.graph.erase_node(dq)
    gm.graph.lint()


def _merge_attention_gemms(gm: torch.fx.GraphModule) -> None:
    """The reference form of ``_merge_siblings``: int8 GEMMs that read the same quantized value
    and whose outputs reach nothing but fused attention, through views (Q, K and V), become one
    GEMM over their stacked int8 weights, split by views. Inductor fuses nothing after such a
    GEMM, so one call replaces three. Weights another GEMM also reads (first-row GEMMs) stay."""
    attention = {n for n in gm.graph.nodes if is_call(n, SDPA)}
    groups: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if is_call(node, aten.linear.default) and is_call(node.args[0], DQ_TENSOR) and _own_int8_weight(node) \
                and read_by_attention_only(node, attention):
            groups.setdefault(node.args[0], []).append(node)
    for nodes in groups.values():
        weights = [[fetch_attr(gm, str(a.target)) for a in n.args[1].args[:3]] for n in nodes]
        biases = [n.args[2] if len(n.args) > 2 else None for n in nodes]
        rows = [w[0].shape[0] for w in weights]
        if len(nodes) < 2 or sum(w[0].numel() for w in weights) > MAX_MERGED_WEIGHT \
                or any(b is not None and b.op != "get_attr" for b in biases) \
                or len({tuple(n.args[1].args[3:]) for n in nodes}) != 1:
            continue
        stacked = [torch.cat([w[i] for w in weights]) for i in range(3)]
        bias = torch.cat([fetch_attr(gm, str(b.target)) if b is not None else torch.zeros(r)
                          for b, r in zip(biases, rows)])
        first = nodes[0]
        with gm.graph.inserting_before(first):
            names = [add_constant(gm, f"{first.name}_merged_{part}", t)
                     for part, t in zip(("weight_int8", "weight_scale", "weight_zero_point", "bias"), (*stacked, bias))]
            codes, scale, zero_point, b = (gm.graph.get_attr(name) for name in names)
            w = gm.graph.call_function(DQ_CHANNEL, (codes, scale, zero_point, *first.args[1].args[3:]))
            merged = gm.graph.call_function(aten.linear.default, (first.args[0], w, b))
            parts = gm.graph.call_function(aten.split_with_sizes.default, (merged, rows, -1))
        meta.inherit(merged, first, STEP)
        merged.meta[meta.WEIGHT_QUANT] = first.meta[meta.WEIGHT_QUANT]
        for i, node in enumerate(nodes):
            with gm.graph.inserting_before(node):
                part = gm.graph.call_function(operator.getitem, (parts, i))
            meta.inherit(part, node, STEP)
            node.replace_all_uses_with(part)
            gm.graph.erase_node(node)


def _own_int8_weight(linear: torch.fx.Node) -> bool:
    """Whether ``linear`` reads int8 weight codes, scales and zero points that no other node reads."""
    w = linear.args[1]
    return is_call(w, DQ_CHANNEL) and len(w.users) == 1 \
        and all(isinstance(a, torch.fx.Node) and a.op == "get_attr" and len(a.users) == 1 for a in w.args[:3])


class CompiledInt8(torch.nn.Module):
    """A torch.compile'd int8 graph whose (re)compilations run with freezing on.

    Freezing must be set in inductor's global config while compiling: passed as
    ``torch.compile(options=...)`` it does not reach the int8 weight-prepacking patterns
    (torch 2.13: ``onednn.qlinear_prepack`` is then left on a graph input and fails).

    ``reference`` (what ``outlierfx.save`` writes and ``export_onnx`` exports) is never handed to
    the compiler: it compiles :func:`_compiler_copy` of it."""

    def __init__(self, reference: torch.fx.GraphModule, dynamic: bool | None = None) -> None:
        super().__init__()
        self.reference = reference
        self.compiled = torch.compile(_compiler_copy(reference), dynamic=dynamic)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch._inductor.config.patch(INDUCTOR_OPTIONS), torch.no_grad():
            return self.compiled(*args, **kwargs)


def _compiler_copy(reference: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``reference`` for torch.compile: its own graph (sharing the tensors), with no
    ``val`` on any node.

    Compiling a GraphModule edits it: torch 2.13's dynamo runs ``insert_deferred_runtime_asserts``
    on the module it traces, which merges size nodes whose symbolic values are equal, in place,
    without regenerating the module's code. The next compilation (another input shape, e.g. a
    decode step after the prefill) maps the code's lines to node metadata by index and fails with
    an IndexError. Dynamo traces the code and makes its own values, so the copy needs none; with
    none, the pass has nothing to merge.

    The copy calls the online Hadamard's plain function in place of its custom op: inductor runs
    a custom op as an opaque call back into Python (157 us of CPU a call on a SmolLM2 decode
    step, 4.7 of its 33 ms), and compiles the function's two small GEMMs in."""
    copy = copy_graph_module(reference)
    for node in copy.graph.nodes:
        node.meta.pop("val", None)
        if is_call(node, HADAMARD):
            node.target = rotate_last_axis
    copy.recompile()
    return copy
