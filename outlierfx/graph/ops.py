"""The canonical op vocabulary: one node per concept, so passes match each pattern once.

After :func:`~outlierfx.graph.canonicalize.canonicalize`, every concept below is exactly one
``call_function`` node with the listed aten target.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator

import torch
import torch.fx

from . import hadamard_op  # noqa: F401  (registers torch.ops.outlierfx.hadamard, which rotated graphs call)

aten = torch.ops.aten
# fused attention (FuseAttention writes it; the backends lower around it)
SDPA = aten.scaled_dot_product_attention.default


class OpKind(enum.Enum):
    LINEAR = "linear"
    LAYER_NORM = "layer_norm"
    RMS_NORM = "rms_norm"
    ADD = "add"
    MATMUL = "matmul"
    SOFTMAX = "softmax"
    ACTIVATION = "activation"
    EMBEDDING = "embedding"


CANONICAL_TARGETS: dict[OpKind, tuple] = {
    OpKind.LINEAR: (aten.linear.default,),
    OpKind.LAYER_NORM: (aten.layer_norm.default,),
    OpKind.RMS_NORM: (aten.rms_norm.default,),
    OpKind.ADD: (aten.add.Tensor,),
    OpKind.MATMUL: (aten.matmul.default,),
    OpKind.SOFTMAX: (aten.softmax.int,),
    OpKind.ACTIVATION: (
        aten.gelu.default,
        aten.silu.default,
        aten.relu.default,
        aten.tanh.default,
        aten.sigmoid.default,
    ),
    OpKind.EMBEDDING: (aten.embedding.default,),
}
_KIND_OF_TARGET = {t: kind for kind, targets in CANONICAL_TARGETS.items() for t in targets}

NORM_KINDS = (OpKind.LAYER_NORM, OpKind.RMS_NORM)

# Ops that move or re-label elements without mixing channels of the last (hidden) axis.
# A Linear reached from a norm through these still sees the norm's channels in the same order.
_LAST_AXIS_PRESERVING = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.expand.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.detach.default,
    aten.slice.Tensor,
    aten.select.int,
    aten.index.Tensor,
    aten.dropout.default,
}


def op_kind(node: torch.fx.Node) -> OpKind | None:
    """The canonical concept of ``node``, or None for everything else."""
    if node.op != "call_function":
        return None
    kind = _KIND_OF_TARGET.get(node.target)
    if kind is OpKind.ADD and not all(isinstance(a, torch.fx.Node) for a in node.args[:2]):
        return None  # x + scalar is arithmetic, not a residual or embedding sum
    return kind


def is_kind(node: torch.fx.Node, *kinds: OpKind) -> bool:
    return op_kind(node) in kinds


def tensor_val(node: object) -> torch.Tensor | None:
    """The example value (usually a FakeTensor) recorded for a node, if it is a tensor."""
    if not isinstance(node, torch.fx.Node):
        return None
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def is_float_tensor(node: object) -> bool:
    val = tensor_val(node)
    return val is not None and val.dtype.is_floating_point


def preserves_last_axis(node: torch.fx.Node, source: torch.fx.Node) -> bool:
    """Whether ``node`` passes ``source`` on with its last axis (channels) unchanged."""
    if node.op != "call_function" or not node.args or node.args[0] is not source:
        return False
    if node.target not in _LAST_AXIS_PRESERVING:
        return False
    src, out = tensor_val(source), tensor_val(node)
    if src is None or out is None or src.dim() == 0 or out.dim() == 0:
        return False
    if node.target in (aten.slice.Tensor, aten.select.int):
        dim = node.args[1] if len(node.args) > 1 else 0
        if dim % src.dim() == src.dim() - 1:
            return False
    if node.target is aten.index.Tensor:
        indices = node.args[1]
        if len(indices) >= src.dim() and indices[src.dim() - 1] is not None:
            return False
    return same_size(src.shape[-1], out.shape[-1])


def same_size(a: object, b: object) -> bool:
    """Whether two sizes (ints or symbolic sizes) are the same."""
    try:
        return int(a) == int(b)  # type: ignore[call-overload]
    except (TypeError, ValueError, RuntimeError):
        return str(a) == str(b)


def users_through_layout_ops(node: torch.fx.Node) -> Iterator[tuple[torch.fx.Node, torch.fx.Node]]:
    """Yield ``(user, operand)`` pairs: the real consumers of ``node``'s values.

    Walks through ops that keep the last axis intact (view, reshape, unsqueeze, dropout...);
    ``operand`` is the node the consumer actually reads (``node`` itself or a layout op of it).
    """
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        for user in current.users:
            if user in seen:
                continue
            seen.add(user)
            if preserves_last_axis(user, current):
                stack.append(user)
            else:
                yield user, current


def feeds_only_outputs(node: torch.fx.Node) -> bool:
    """Whether every value of ``node`` leaves the graph as it is (through layout ops only): a
    model's output head, such as the LM head whose result is the logits."""
    readers = list(users_through_layout_ops(node))
    return bool(readers) and all(user.op == "output" for user, _ in readers)


def producer_through_layout_ops(node: torch.fx.Node) -> torch.fx.Node:
    """The node whose values ``node`` shows, walking back through last-axis-preserving layout ops."""
    while node.args and isinstance(node.args[0], torch.fx.Node) and preserves_last_axis(node, node.args[0]):
        node = node.args[0]
    return node


def has_stored_weight(linear: torch.fx.Node) -> bool:
    """A Linear whose weight is a stored tensor (a ``get_attr``), which a pass can rewrite."""
    return is_kind(linear, OpKind.LINEAR) and isinstance(linear.args[1], torch.fx.Node) \
        and linear.args[1].op == "get_attr"



def is_call(node: object, target: object) -> bool:
    """Whether ``node`` is an FX node calling the function ``target``."""
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is target
