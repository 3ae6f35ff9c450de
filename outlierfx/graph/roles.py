"""What each activation tensor *is* in a transformer, found structurally.

Roles drive observer placement and mixed precision. They follow Bondarenko et al.'s list of
quantized tensors: Linear inputs and outputs, embedding sums, norm outputs, residual sums,
attention scores (before the mask is added), attention probabilities (softmax output) and the
attention context; plus the FFN input, FFN output and residual sums that their mixed-precision
scheme keeps at 16 bit.
"""

from __future__ import annotations

import enum

import networkx as nx
import torch.fx

from .ops import NORM_KINDS, OpKind, is_float_tensor, is_kind, op_kind, preserves_last_axis
from .view import GraphView


class Role(enum.Enum):
    LINEAR_INPUT = "linear_input"
    LINEAR_OUTPUT = "linear_output"
    NORM_OUTPUT = "norm_output"
    RESIDUAL_SUM = "residual_sum"
    EMBEDDING_SUM = "embedding_sum"
    ATTN_SCORES = "attention_scores"
    ATTN_PROBS = "attention_probs"
    ATTN_CONTEXT = "attention_context"
    FFN_INPUT = "ffn_input"
    FFN_OUTPUT = "ffn_output"


def tensor_roles(view: GraphView) -> dict[torch.fx.Node, frozenset[Role]]:
    """Map each float activation node to its roles (nodes without a role are absent)."""
    roles: dict[torch.fx.Node, set[Role]] = {}

    def add(node: object, role: Role) -> None:
        if isinstance(node, torch.fx.Node) and node.op != "get_attr" and is_float_tensor(node):
            roles.setdefault(node, set()).add(role)

    for node in view.gm.graph.nodes:
        kind = op_kind(node)
        if kind is OpKind.LINEAR:
            add(node.args[0], Role.LINEAR_INPUT)
            add(node, Role.LINEAR_OUTPUT)
        elif kind in NORM_KINDS:
            add(node, Role.NORM_OUTPUT)
        elif kind is OpKind.SOFTMAX:
            add(node, Role.ATTN_PROBS)
            add(_scores_matmul(node), Role.ATTN_SCORES)
            add(_context_matmul(node), Role.ATTN_CONTEXT)
    for res in view.residual_adds:
        add(res.add, Role.RESIDUAL_SUM)
        if res.kind == "mlp":
            inner = view.between(res.origin, res.branch) | {res.branch}
            add(res.branch, Role.FFN_OUTPUT)
            linears = [n for n in inner if is_kind(n, OpKind.LINEAR)]
            for node in linears:  # the FFN's first Linears: no other FFN Linear upstream
                if not any(other is not node and nx.has_path(view.digraph, other, node) for other in linears):
                    add(node.args[0], Role.FFN_INPUT)
    for node in _embedding_outputs(view):
        add(node, Role.EMBEDDING_SUM)
    return {node: frozenset(r) for node, r in roles.items()}


def _through_layout_back(node: object) -> object:
    while isinstance(node, torch.fx.Node) and node.args and isinstance(node.args[0], torch.fx.Node) \
            and preserves_last_axis(node, node.args[0]):
        node = node.args[0]
    return node


def _scores_matmul(softmax: torch.fx.Node) -> torch.fx.Node | None:
    """The q @ k^T product feeding a softmax, before the mask is added and the scale applied."""
    node = softmax.args[0]
    for _ in range(6):
        node = _through_layout_back(node)
        if not isinstance(node, torch.fx.Node):
            return None
        if is_kind(node, OpKind.MATMUL):
            return node
        if node.op == "call_function" and node.args and isinstance(node.args[0], torch.fx.Node):
            node = node.args[0]  # mask add, scale multiply, division by sqrt(d)...
        else:
            return None
    return None


def _context_matmul(softmax: torch.fx.Node) -> torch.fx.Node | None:
    stack = [softmax]
    while stack:
        node = stack.pop()
        for user in node.users:
            if is_kind(user, OpKind.MATMUL) and user.args[0] is node:
                return user
            if preserves_last_axis(user, node):
                stack.append(user)
    return None


def _embedding_outputs(view: GraphView) -> list[torch.fx.Node]:
    """Embedding lookups and sums of them, at the point where they leave the embedding block."""
    residual = {r.add for r in view.residual_adds}
    embedded: set[torch.fx.Node] = set()
    for node in view.gm.graph.nodes:
        if is_kind(node, OpKind.EMBEDDING) and is_float_tensor(node):
            embedded.add(node)
        elif is_kind(node, OpKind.ADD) and node not in residual and all(
                _through_layout_back(a) in embedded for a in node.args[:2]):
            embedded.add(node)
    return [n for n in embedded if not any(u in embedded for u in n.users)]
