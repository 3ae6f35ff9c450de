"""RotateHeads (QuaRot, Ashkboos et al. 2024): rotate every attention head's values by a seeded
Hadamard matrix H, folded into the value and output projections.

Attention mixes value *rows* (tokens) and never the channels within a head: softmax(QK^T) (V H)
= (softmax(QK^T) V) H. So rotating each head's slice of the value projection's output by H
rotates each head's slice of the attention context by the same H, and the output projection,
which reads the context, takes the inverse:
- the value Linear (``v = x W_v^T + b_v``): W_v -> B^T W_v, b_v -> b_v B;
- the output Linear reading the context: W_o -> W_o B;
with B = diag(H, ..., H), one block per head. No op is added (zero run-time cost). What changes
is the output projection's input: a head's outlier channels are spread over its head_dim
channels, which a per-tensor int8 grid needs. Unlike :mod:`.rotate_residual` this is exact for
every architecture (LayerNorm or RMSNorm, pre- or post-LN, grouped-query or not).

The path from the value Linear to the attention and on to the output Linear may only reshape
(keeping the last axis a multiple of head_dim), transpose or expand other axes, repeat heads
(grouped-query attention) and be read as the values of ``probs @ V`` or scaled_dot_product_
attention. Any other reader, or a fused QKV projection, blocks that head path; the plan says where.

On a KV-cache graph (:data:`~outlierfx.graph.meta.GM_CACHE_GRAPH`) the path may also go through
the cache write, ``index_copy(values_cache, seq_axis, positions, new_values)``: the cache then
holds rotated values, which is exact because only the graph itself writes and reads it (the
cache returned by one call is the next call's input). The returned caches differ from the
unrotated graph's; the logits do not, and the pass manager compares those.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from ..graph import meta
from ..graph.ops import SDPA, OpKind, aten, is_kind, preserves_last_axis, tensor_val
from ..quantizers.hadamard import hadamard
from .base import GraphPass
from .rotation_folding import check_tensors, fold, linear_uses

NAME = "RotateHeads"
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_TRANSPOSES = {aten.transpose.int, aten.permute.default}
_CACHE_WRITE = aten.index_copy.default


@dataclasses.dataclass(frozen=True)
class HeadPath:
    value: torch.fx.Node  # the Linear producing the values
    context: torch.fx.Node  # probs @ V (or scaled_dot_product_attention)
    output: torch.fx.Node  # the Linear reading the attention context


@dataclasses.dataclass(frozen=True)
class RotateHeadsPlan:
    head_dim: int
    seed: int
    construction: str
    paths: tuple[HeadPath, ...]
    blockers: tuple[tuple[str, str], ...]  # (where, why that head path is left alone)
    rotation: torch.Tensor | None = dataclasses.field(default=None, repr=False, compare=False)

    def summary(self) -> str:
        if not self.paths:
            lines = ["no attention head rotated"]
        else:
            lines = [f"rotated the values of {len(self.paths)} attention layers per head (head_dim={self.head_dim}) "
                     f"by {self.construction}, seed {self.seed}, folded into the value and output Linears"]
        return "\n".join(lines + [f"  not rotated at {where}: {why}" for where, why in self.blockers])


class RotateHeads(GraphPass[RotateHeadsPlan]):
    """Rotate the attention values per head (see module docstring)."""

    # fp32 rounding of the rotated weights and of head_dim-long sums: the same bound as
    # RotateResidual's (measured in tests/test_rotate_heads.py on generated models)
    output_rel_tol = 1e-5

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def analyze(self, gm: torch.fx.GraphModule) -> RotateHeadsPlan:
        blockers: list[tuple[str, str]] = []
        paths: list[HeadPath] = []
        head_dims = set()
        for context in gm.graph.nodes:
            values = _values_operand(context)
            if values is None:
                continue
            head_dim = int(tensor_val(context).shape[-1])
            path, why = _head_path(context, values, head_dim, bool(gm.meta.get(meta.GM_CACHE_GRAPH)))
            if path is None:
                blockers.append((_where(context), why))
                continue
            paths.append(path)
            head_dims.add(head_dim)
        if len(head_dims) > 1:
            return RotateHeadsPlan(0, self.seed, "", (), (("graph", f"several head sizes {sorted(head_dims)}"),))
        uses = linear_uses([p.output for p in paths], [p.value for p in paths])
        tensor_blockers: list[tuple[str, str]] = []
        check_tensors(gm, uses, tensor_blockers, _where)
        if tensor_blockers or not paths:
            return RotateHeadsPlan(0, self.seed, "", (), tuple(blockers + tensor_blockers))
        head_dim = head_dims.pop()
        rotation = hadamard(head_dim, self.seed)
        return RotateHeadsPlan(head_dim, self.seed, rotation.construction, tuple(paths), tuple(blockers),
                               rotation.matrix)

    def apply(self, gm: torch.fx.GraphModule, plan: RotateHeadsPlan) -> bool:
        if not plan.paths:
            return False
        uses = linear_uses([p.output for p in plan.paths], [p.value for p in plan.paths])
        fold(gm, {str(tensor.target): (how, plan.rotation) for _, tensor, how in uses}, NAME)
        return True


def _values_operand(node: torch.fx.Node) -> torch.fx.Node | None:
    """The values input of an attention's context product: ``probs @ V`` with ``probs`` a softmax
    (through layout ops), or scaled_dot_product_attention's third argument."""
    if node.op != "call_function" or tensor_val(node) is None:
        return None
    if node.target is SDPA:
        return node.args[2] if isinstance(node.args[2], torch.fx.Node) else None
    if is_kind(node, OpKind.MATMUL) and isinstance(node.args[0], torch.fx.Node) \
            and isinstance(node.args[1], torch.fx.Node) and _from_softmax(node.args[0]):
        return node.args[1]
    return None


def _from_softmax(node: torch.fx.Node) -> bool:
    for _ in range(8):
        if is_kind(node, OpKind.SOFTMAX):
            return True
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
            return False
        node = node.args[0]  # dropout, a cast, a layout op
    return False


def _cache_write(node: torch.fx.Node, source: torch.fx.Node, cache_graph: bool) -> bool:
    """Whether ``node`` writes ``source`` into a cache input of a KV-cache graph along an axis
    other than the last: ``index_copy(cache_input, dim, positions, source)``."""
    if not cache_graph or node.op != "call_function" or node.target is not _CACHE_WRITE or len(node.args) < 4:
        return False
    cache, dim, new = node.args[0], node.args[1], node.args[3]
    out = tensor_val(node)
    return (new is source and isinstance(cache, torch.fx.Node) and cache.op == "placeholder"
            and out is not None and int(dim) % out.dim() != out.dim() - 1)


def _passed_on(node: torch.fx.Node) -> torch.fx.Node | None:
    """The operand whose head blocks ``node`` passes on: a cache write's new values, else the
    first argument."""
    operand = node.args[3] if node.target is _CACHE_WRITE and len(node.args) >= 4 else \
        node.args[0] if node.args else None
    return operand if isinstance(operand, torch.fx.Node) else None


def _keeps_head_blocks(node: torch.fx.Node, source: torch.fx.Node, head_dim: int, cache_graph: bool = False) -> bool:
    """Whether ``node`` passes ``source`` on with every head_dim-long chunk of its last axis kept
    whole (the block-diagonal rotation then commutes with it)."""
    if preserves_last_axis(node, source) or _cache_write(node, source, cache_graph):
        return True
    if node.op != "call_function" or not node.args or node.args[0] is not source:
        return False
    src, out = tensor_val(source), tensor_val(node)
    if src is None or out is None or src.dim() == 0 or out.dim() == 0:
        return False
    if node.target in _RESHAPES:  # row-major: chunks aligned before stay aligned after
        try:
            return int(src.shape[-1]) % head_dim == 0 and int(out.shape[-1]) % head_dim == 0
        except (TypeError, ValueError, RuntimeError):
            return False
    if node.target is aten.transpose.int:
        last = src.dim() - 1
        return all(int(d) % src.dim() != last for d in node.args[1:3])
    if node.target is aten.permute.default:
        dims = [int(d) % src.dim() for d in node.args[1]]
        return dims[-1] == src.dim() - 1
    return False


def _head_path(context: torch.fx.Node, values: torch.fx.Node, head_dim: int, cache_graph: bool = False
               ) -> tuple[HeadPath | None, str]:
    """The value Linear feeding ``context`` and the output Linear reading it, each joined to it
    by block-keeping ops only, with no other reader on the way (on a cache graph the returned
    cache is no reader: only the graph's next call reads it)."""
    value = values
    while not is_kind(value, OpKind.LINEAR):
        upstream = _passed_on(value) if value.op == "call_function" else None
        if upstream is None or not _keeps_head_blocks(value, upstream, head_dim, cache_graph):
            return None, f"the values come from {value.target}, not a Linear through layout ops"
        value = upstream
    readers = [(user, operand) for user, operand in _consumers(value, head_dim, cache_graph)
               if not (user.op == "output" and _cache_write(operand, _passed_on(operand), cache_graph))]
    if readers != [(context, values)]:
        others = ", ".join(user.name for user, _ in readers if user is not context)
        return None, f"the value projection is also read by {others}"
    readers = _consumers(context, head_dim)
    if len(readers) != 1 or not is_kind(readers[0][0], OpKind.LINEAR) or readers[0][0].args[0] is not readers[0][1]:
        return None, f"the attention context is read by {', '.join(user.name for user, _ in readers)}, " \
                     f"not by one Linear"
    return HeadPath(value, context, readers[0][0]), ""


def _consumers(start: torch.fx.Node, head_dim: int, cache_graph: bool = False
               ) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """``(consumer, operand)`` for every reader of ``start``'s values, followed through
    block-keeping ops."""
    found, stack = [], [start]
    while stack:
        node = stack.pop()
        for user in node.users:
            if _keeps_head_blocks(user, node, head_dim, cache_graph):
                stack.append(user)
            elif (user, node) not in found:
                found.append((user, node))
    return found


def _where(node: torch.fx.Node) -> str:
    return meta.module_path(node) or node.name
