"""A networkx view of a canonical graph: residual stream, norm sites and transformer blocks.

Everything is found structurally, never from module names:
- a *residual add* is ``add(shortcut, branch)`` of two same-shape float tensors where the
  shortcut is an ancestor of the branch and the path between them passes through a Linear;
- a *block* is an attention sublayer (a residual branch containing a softmax) together with the
  sublayers up to the next attention sublayer;
- a *norm site* is a layer_norm / rms_norm node with the consumers of its output, found through
  layout-only ops (view, reshape, dropout...).
Module paths are used only to name things in reports.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os

import networkx as nx
import torch.fx

from . import meta
from .ops import SDPA, NORM_KINDS, OpKind, is_float_tensor, is_kind, op_kind, tensor_val, users_through_layout_ops


@dataclasses.dataclass(frozen=True)
class ResidualAdd:
    add: torch.fx.Node
    shortcut: torch.fx.Node
    branch: torch.fx.Node
    kind: str  # "attention" or "mlp"
    origin: torch.fx.Node  # where the branch leaves the stream (the shortcut, or the node a scaled shortcut reads)


@dataclasses.dataclass(frozen=True)
class NormSite:
    norm: torch.fx.Node
    kind: OpKind
    source: torch.fx.Node  # the tensor being normalized
    linears: tuple[torch.fx.Node, ...]  # Linears reading the norm output as their input
    residual_adds: tuple[torch.fx.Node, ...]  # residual adds reading it as their shortcut
    others: tuple[torch.fx.Node, ...]  # any other consumer (including the graph output)
    reads: tuple[tuple[torch.fx.Node, torch.fx.Node], ...]  # (consumer, the input it reads the norm through)

    def operand(self, consumer: torch.fx.Node) -> torch.fx.Node:
        """The input of ``consumer`` that carries the norm output (the norm or a layout op of it)."""
        return next(operand for user, operand in self.reads if user is consumer)

    @property
    def is_post_ln(self) -> bool:
        """Whether the norm output is also carried on the residual stream (BERT-style)."""
        return bool(self.residual_adds)


@dataclasses.dataclass(frozen=True)
class Block:
    index: int
    path: str  # common module path of the block's layers, e.g. "encoder.layer.3"
    sublayers: tuple[ResidualAdd, ...]
    norms: tuple[torch.fx.Node, ...]


class GraphView:
    """Read-only structural queries over a captured ``GraphModule``.

    Build it again after mutating the graph; nodes are the graph's own ``torch.fx.Node`` objects.
    """

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        self.order = {node: i for i, node in enumerate(gm.graph.nodes)}
        self.digraph = nx.DiGraph()
        for node in gm.graph.nodes:
            self.digraph.add_node(node, op=node.op, kind=(k.value if (k := op_kind(node)) else None))
            for inp in node.all_input_nodes:
                self.digraph.add_edge(inp, node)

    def between(self, start: torch.fx.Node, end: torch.fx.Node) -> set[torch.fx.Node]:
        """Nodes on some path from ``start`` to ``end`` (both excluded)."""
        return nx.descendants(self.digraph, start) & nx.ancestors(self.digraph, end)

    @functools.cached_property
    def residual_adds(self) -> tuple[ResidualAdd, ...]:
        found = []
        for node in self.gm.graph.nodes:
            if not is_kind(node, OpKind.ADD) or not all(is_float_tensor(a) for a in node.args[:2]):
                continue
            a, b = node.args[:2]
            if not _same_shape(a, node) or not _same_shape(b, node):
                continue
            for shortcut, branch in ((a, b), (b, a)):
                origin = self._shortcut_origin(shortcut, branch)
                if origin is None or not self._carries_activations(origin):
                    continue
                inner = self.between(origin, branch) | {branch}
                if any(is_kind(n, OpKind.LINEAR) for n in inner):
                    # a softmax, or the one SDPA call FuseAttention made of it (a block's boundary
                    # either way: block-order runs load one block's weights at a time)
                    kind = "attention" if any(is_kind(n, OpKind.SOFTMAX) or n.target is SDPA for n in inner) else "mlp"
                    found.append(ResidualAdd(node, shortcut, branch, kind, origin))
                    break
        return tuple(found)

    def _shortcut_origin(self, shortcut: torch.fx.Node, branch: torch.fx.Node, max_steps: int = 8) -> torch.fx.Node | None:
        """Where the shortcut leaves the stream: ``shortcut`` itself if the branch descends from it,
        else the nearest such node up a chain of single-input ops (e.g. the per-channel multiply
        that gamma migration or Quadapter puts on a post-LN shortcut; parameters, and values
        computed from parameters only, do not count as inputs)."""
        node = shortcut
        for _ in range(max_steps):
            if node is not branch and nx.has_path(self.digraph, node, branch):
                return node
            tensor_inputs = [n for n in node.all_input_nodes if not self.is_constant(n)]
            if node.op != "call_function" or len(tensor_inputs) != 1:
                return None
            node = tensor_inputs[0]
        return None

    def _carries_activations(self, node: torch.fx.Node) -> bool:
        """Whether ``node`` holds model activations: it descends from an embedding, a Linear or
        a float input. An attention mask made from the integer ``attention_mask`` does not,
        although later layers' scores descend from it (with one head the two even share a
        shape)."""
        for n in itertools.chain((node,), nx.ancestors(self.digraph, node)):
            if is_kind(n, OpKind.EMBEDDING, OpKind.LINEAR) or (n.op == "placeholder" and is_float_tensor(n)):
                return True
        return False

    def is_constant(self, node: torch.fx.Node) -> bool:
        """A parameter, or a value computed from parameters only (no graph input upstream)."""
        return node.op == "get_attr" or (node.op == "call_function" and not any(
            n.op == "placeholder" for n in nx.ancestors(self.digraph, node)))

    @functools.cached_property
    def residual_stream(self) -> tuple[torch.fx.Node, ...]:
        """The tensors that carry the hidden state: each residual add and each shortcut, in order."""
        nodes = {r.add for r in self.residual_adds} | {r.shortcut for r in self.residual_adds}
        return tuple(sorted(nodes, key=self.order.__getitem__))

    @functools.cached_property
    def norm_sites(self) -> tuple[NormSite, ...]:
        shortcut_of = {r.add: r.shortcut for r in self.residual_adds}
        sites = []
        for node in self.gm.graph.nodes:
            kind = op_kind(node)
            if kind not in NORM_KINDS:
                continue
            linears, adds, others = [], [], []
            reads = tuple(users_through_layout_ops(node))
            for user, operand in reads:
                if is_kind(user, OpKind.LINEAR) and user.args[0] is operand:
                    linears.append(user)
                elif shortcut_of.get(user) is operand:
                    adds.append(user)
                else:
                    others.append(user)
            key = self.order.__getitem__
            sites.append(NormSite(node, kind, node.args[0], *(tuple(sorted(x, key=key)) for x in (linears, adds, others)),
                                  reads))
        return tuple(sites)

    @functools.cached_property
    def blocks(self) -> tuple[Block, ...]:
        groups: list[list[ResidualAdd]] = []
        for res in self.residual_adds:
            if res.kind == "attention" or not groups:
                groups.append([])
            groups[-1].append(res)
        blocks = []
        for i, group in enumerate(groups):
            members = set()
            for res in group:
                members |= self.between(res.origin, res.branch) | {res.branch, res.add}
            norms = tuple(sorted((n for n in members if op_kind(n) in NORM_KINDS), key=self.order.__getitem__))
            paths = [meta.module_path(n) for n in members if is_kind(n, OpKind.LINEAR)]
            blocks.append(Block(i, _common_path(paths), tuple(group), norms))
        return tuple(blocks)

    def describe(self) -> str:
        """A short text summary: blocks, norm sites and their consumers."""
        lines = [f"{len(self.blocks)} transformer blocks, {len(self.residual_adds)} residual adds, "
                 f"{len(self.norm_sites)} norm sites"]
        for block in self.blocks:
            kinds = "+".join(r.kind for r in block.sublayers)
            lines.append(f"  block {block.index}: {block.path or '?'} ({kinds})")
        for site in self.norm_sites:
            style = "; output also on the residual stream (post-LN)" if site.is_post_ln else ""
            lines.append(
                f"  {site.kind.value} {meta.module_path(site.norm) or site.norm.name}: feeds {len(site.linears)} "
                f"linear, {len(site.residual_adds)} residual add, {len(site.others)} other{style}"
            )
        return "\n".join(lines)


def _same_shape(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    va, vb = tensor_val(a), tensor_val(b)
    return va is not None and vb is not None and va.dim() == vb.dim() and all(
        str(x) == str(y) for x, y in zip(va.shape, vb.shape)
    )


def _common_path(paths: list[str]) -> str:
    if not paths:
        return ""
    parts = [p.split(".") for p in paths]
    prefix = os.path.commonprefix(parts)
    return ".".join(prefix)
