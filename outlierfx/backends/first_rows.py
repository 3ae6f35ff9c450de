"""First-token grids in the reference form: the first rows ride along as a small shadow graph.

A ``+sink`` quantizer puts the first ``n`` positions of a ``[batch, seq, ...]`` activation on a
grid of their own. In the reference form (:mod:`outlierfx.backends.reference`) it becomes

    main = dequantize(quantize(x, main grid))              every row: the int8 GEMM's input
    head = dequantize(quantize(x[:, :n], first grid))      the first rows on their grid

and the first rows of ``main`` are wrong. :func:`follow_first_rows` then walks the graph in
order: a row-wise op (a Linear, an elementwise op, a norm over the last dimension) that reads
such a pair runs twice, on the main tensors as before and on the ``batch x n`` first rows
beside them, and its output is again a pair. Only where rows mix (attention) or the graph ends
are the two joined. The first rows are each text's first tokens (:class:`Rows`): gathered from
the columns the graph's first-token mask marks (left padding moves them, a decode step behind
a filled cache has none), or columns ``0..n-1`` in a graph without one. The main graph so keeps the shapes inductor's int8
patterns fuse (``dequantize -> linear -> gelu/add -> quantize``), and the first rows cost
GEMMs of ``batch x n`` rows.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from ..graph import meta
from ..graph.first_tokens import first_token_columns, gather_rows, scatter_rows
from ..graph.ops import is_call, tensor_val

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed

FIRST_ROWS_UNREAD = "outlierfx_first_rows_unread"
"""Meta of a main-grid quantize whose first rows are recomputed on their own grid."""

@dataclasses.dataclass(frozen=True)
class Rows:
    """The first ``n`` tokens of each text as graph nodes: ``first`` the graph's first-token
    mask ``[batch, seq]`` and ``index`` their columns ``[batch, n]`` (both None: columns
    ``0..n-1``, in a graph called without an attention mask)."""

    n: int
    first: torch.fx.Node | None = None
    index: torch.fx.Node | None = None

    @classmethod
    def of(cls, graph: torch.fx.Graph, n: int, first: torch.fx.Node | None) -> Rows:
        """The rows of first-token mask ``first`` (its column index computed right after it)."""
        if first is None:
            return cls(n)
        with graph.inserting_after(first):
            index = graph.call_function(first_token_columns, (first, n))
        meta.inherit(index, first, "Lower")
        return cls(n, first, index)

    def cut(self, graph: torch.fx.Graph, x: torch.fx.Node, dim: int = 1) -> torch.fx.Node:
        """``x``'s first-token rows ``[batch, n, ...]`` (its tokens on ``dim``: 1, or 0 for a
        tensor without the batch, in a graph without a first-token mask)."""
        if self.index is None:
            return graph.call_function(aten.slice.Tensor, (x, dim, 0, self.n))
        return graph.call_function(gather_rows, (x, self.index))

    def is_cut(self, node: torch.fx.Node, x: torch.fx.Node) -> bool:
        """Whether ``node`` is :meth:`cut` of ``x``."""
        if self.index is None:
            return node.target is aten.slice.Tensor and tuple(node.args) == (x, 1, 0, self.n)
        return node.target is gather_rows and tuple(node.args) == (x, self.index)

    def join(self, graph: torch.fx.Graph, main: torch.fx.Node, head: torch.fx.Node) -> torch.fx.Node:
        """``main`` with its first-token rows from ``head``."""
        if self.index is None:
            return graph.call_function(aten.slice_scatter.default, (main, head, 1, 0, self.n))
        return graph.call_function(scatter_rows, (main, head, self.first))


_ELEMENTWISE = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.gelu.default, aten.silu.default,
    aten.relu.default, aten.tanh.default, aten.sigmoid.default, aten.neg.default, aten.rsqrt.default,
    aten.pow.Tensor_Scalar, aten._to_copy.default,
}
_ACTIVATIONS = {aten.gelu.default, aten.silu.default, aten.relu.default, aten.tanh.default, aten.sigmoid.default}
_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default}


def follow_first_rows(gm: torch.fx.GraphModule, pairs: dict[torch.fx.Node, tuple[torch.fx.Node, Rows]]) -> None:
    """Carry each ``main -> (head, rows)`` pair in ``pairs`` through the row-wise ops that read it.

    A main-grid quantize marked :data:`FIRST_ROWS_UNREAD` reads its main input as it is, and
    the first rows of a main tensor (:meth:`Rows.cut`) become its head; other readers get the
    two joined (:meth:`Rows.join`), made once per tensor."""
    graph = gm.graph
    heads = dict(pairs)
    joined: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in list(graph.nodes):
        read = [a for a in node.all_input_nodes if a in heads]
        if not read:
            continue
        if FIRST_ROWS_UNREAD in node.meta:
            continue
        if len(read) == 1 and heads[read[0]][1].is_cut(node, read[0]):
            node.replace_all_uses_with(heads[read[0]][0])
            graph.erase_node(node)
            continue
        head = _row_wise_head(graph, node, heads)
        if head is not None:
            heads[node] = (head, heads[read[0]][1])
            continue
        for main in read:
            if main not in joined:
                with graph.inserting_before(node):
                    joined[main] = heads[main][1].join(graph, main, heads[main][0])
                meta.inherit(joined[main], main, "Lower")
            node.replace_input_with(main, joined[main])


def first_rows_of_value(graph: torch.fx.Graph, x: torch.fx.Node, rows: Rows) -> torch.fx.Node:
    """``x``'s first-token rows, for the first-token grid of a quantizer that reads ``x``.

    Where ``x`` is a Linear, or an elementwise activation of one (MiniLM's GELU), that nothing
    else reads, the rows are recomputed from the first rows of the Linear's quantized input
    instead (a GEMM of ``batch x n`` rows on its own weight dequantize): a slice would give
    ``x`` a second reader, and inductor then writes the whole float output and quantizes it in
    a separate kernel instead of fusing the activation and the quantize into the int8 GEMM."""
    act, linear = (x, x.args[0]) if _is_activation(x) else (None, x)
    if not (is_call(linear, aten.linear.default) and len(linear.users) == 1):
        return rows.cut(graph, x)
    dq = linear.args[0]
    q = dq.args[0] if isinstance(dq, torch.fx.Node) and dq.target is qd.dequantize_per_tensor.default else None
    if q is None or q.target is not qd.quantize_per_tensor.default or FIRST_ROWS_UNREAD in q.meta:
        return rows.cut(graph, x)  # its first rows are not on this grid
    first = rows.cut(graph, q.args[0])
    q_rows = graph.call_function(q.target, (first, *q.args[1:]))
    dq_rows = graph.call_function(dq.target, (q_rows, *dq.args[1:]))
    head = graph.call_function(aten.linear.default, (dq_rows, _own_weight_dequantize(graph, linear.args[1]),
                                                     *linear.args[2:]), linear.kwargs)
    if meta.WEIGHT_QUANT in linear.meta:
        head.meta[meta.WEIGHT_QUANT] = linear.meta[meta.WEIGHT_QUANT]
    created = [first, q_rows, dq_rows, head]
    if act is not None:
        head = graph.call_function(act.target, (head, *act.args[1:]), act.kwargs)
        created.append(head)
    for node in created:
        meta.inherit(node, x, "Lower")
    return head


def _is_activation(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in _ACTIVATIONS and isinstance(node.args[0], torch.fx.Node)


def _row_wise_head(graph: torch.fx.Graph, node: torch.fx.Node,
                   heads: dict[torch.fx.Node, tuple[torch.fx.Node, Rows]]) -> torch.fx.Node | None:
    """``node`` on the first rows, beside it (None where it mixes rows or an input cannot be cut
    to its first rows). Its inputs are pairs, parameters, or tensors whose rows are all right."""
    out = tensor_val(node)
    pairs = [a for a in node.all_input_nodes if a in heads]
    if out is None or out.dim() < 3 or len({heads[a][1] for a in pairs}) != 1 or not _row_wise(node, out.dim()):
        return None
    for main in pairs:  # dim 1 is the tokens of every pair: it must stay the output's dim 1
        value = tensor_val(main)
        if value is None or value.dim() != out.dim() or value.shape[1] != out.shape[1]:
            return None
    rows = heads[pairs[0]][1]
    with graph.inserting_before(node):  # cuts an abandoned head leaves behind are dead code
        firsts = {a: heads[a][0] if a in heads else _first_rows_of(graph, a, rows, out) for a in node.all_input_nodes}
        if any(f is None for f in firsts.values()):
            return None
        args = torch.fx.node.map_arg(node.args, lambda a: firsts[a])
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda a: firsts[a])
        if node.target is aten.linear.default:
            weight = _own_weight_dequantize(graph, args[1])
            args = (args[0], weight, *args[2:])
        head = graph.call_function(node.target, args, kwargs)
    meta.inherit(head, node, "Lower")
    if meta.WEIGHT_QUANT in node.meta:
        head.meta[meta.WEIGHT_QUANT] = node.meta[meta.WEIGHT_QUANT]
    return head


def _row_wise(node: torch.fx.Node, rank: int) -> bool:
    """Whether each output row (dim 1) depends only on the same row of the inputs."""
    if node.op != "call_function":
        return False
    if node.target in _ELEMENTWISE or node.target is aten.linear.default:
        return True
    if node.target is aten.layer_norm.default:
        return len(node.args[1]) <= rank - 2
    if node.target in _REDUCTIONS:
        dims = node.args[1] if len(node.args) > 1 else None
        keepdim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
        return bool(dims) and keepdim and all(d % rank >= 2 for d in dims)
    return False


def _first_rows_of(graph: torch.fx.Graph, arg: torch.fx.Node, rows: Rows, out: torch.Tensor) -> torch.fx.Node | None:
    """What ``arg`` contributes to the first-token rows of a row-wise op whose output is ``out``."""
    if arg.op == "get_attr" or _is_weight_dequantize(arg):
        return arg  # parameters: no token dimension
    value = tensor_val(arg)
    if value is None:
        return None
    rank, tokens = out.dim(), out.shape[1]
    if value.dim() <= rank - 2:
        return arg  # broadcasts over batch and tokens
    token_dim = value.dim() - rank + 1  # the dim that lines up with the output's dim 1
    size = value.shape[token_dim]
    if size == 1:
        return arg
    if size != tokens or (token_dim != 1 and rows.index is not None):  # per-text rows need the batch on dim 0
        return None
    cut = rows.cut(graph, arg, token_dim)
    # dense: read as a GEMM's fused residual, a strided view took oneDNN 5 ms instead of 0.07
    dense = graph.call_function(aten.clone.default, (cut,), {"memory_format": torch.contiguous_format})
    for node in (cut, dense):
        meta.inherit(node, arg, "Lower")
    return dense


def _is_weight_dequantize(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is qd.dequantize_per_channel.default \
        and node.args[0].op == "get_attr"


def _own_weight_dequantize(graph: torch.fx.Graph, weight: object) -> object:
    """A second ``dequantize_per_channel`` of an int8 weight for the first rows' GEMM.

    Inductor prepacks a weight for an int8 GEMM only where its dequantize has one reader, and
    common-subexpression elimination would merge two identical dequantizes. The copy states
    the symmetric grid's code range (``-qmax``; symmetric weights never use ``qmin``), an
    equally true but different argument, so the two stay apart and both GEMMs run in int8."""
    if not (isinstance(weight, torch.fx.Node) and _is_weight_dequantize(weight)):
        return weight
    codes, scale, zero_point, axis, qmin, qmax, dtype = weight.args
    copy = graph.call_function(weight.target, (codes, scale, zero_point, axis, -qmax if qmin != -qmax else qmin,
                                                qmax, dtype))
    meta.inherit(copy, weight, "Lower")
    return copy
