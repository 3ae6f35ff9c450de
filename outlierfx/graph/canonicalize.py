"""Canonicalization: rewrite an exported aten graph so that each concept is one node.

Steps, each a function ``(gm) -> number of rewrites``:
- strip export artifacts (guard modules, metadata asserts) and no-op casts/dropouts (a copy that
  changes the memory layout, ``contiguous()`` of a permuted tensor, is not a no-op);
- GPT-2 style ``Conv1D`` (view -> addmm -> view) becomes ``aten.linear``, and so does a Linear
  written as a matrix product with a stored weight (Falcon's ``x @ W.T + b``);
- ``scaled_dot_product_attention`` becomes matmul -> scale -> mask add -> softmax -> matmul, so
  attention scores and probabilities are tensors that observers can see;
- RMSNorm written out as pow/mean/rsqrt/mul becomes one ``aten.rms_norm``;
- the tanh approximation of GELU written out with pow/tanh becomes ``aten.gelu(approximate="tanh")``;
- ``baddbmm`` (BLOOM's ALiBi attention scores) becomes matmul, scale and add;
- aliases (bmm, _softmax) become their canonical target; dead code is removed.

Nothing here matches module names: every rule looks at ops and shapes only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.fx

from . import meta
from .attention_forms import decompose_attention, decompose_baddbmm
from .attrs import del_attr
from .linear_forms import conv1d_to_linear, matmul_to_linear
from .ops import aten, tensor_val
from .rewrite import replace, substitute

_NOOP_CASTS = {
    aten.to.dtype,
    aten.to.device,
    aten.to.dtype_layout,
    aten._to_copy.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.detach.default,
    aten.lift_fresh_copy.default,
}


def strip_export_artifacts(gm: torch.fx.GraphModule) -> int:
    """Drop export's guard call and metadata asserts; checks on inputs happen at our API."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            gm.graph.erase_node(node)
            if hasattr(gm, str(node.target)):
                delattr(gm, str(node.target))
            count += 1
        elif node.op == "call_function" and node.target is aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)
            count += 1
    return count


def remove_noops(gm: torch.fx.GraphModule) -> int:
    """Remove casts to the same dtype/device, eval-mode dropout, ``x * 1`` and ``x + 0``."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        src = node.args[0]
        if node.target in _NOOP_CASTS:
            noop = _same_tensor_type(src, node) and _same_strides(src, node)
        elif node.target is aten.dropout.default:
            train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
            noop = train is False
        elif node.target is aten.mul.Tensor and len(node.args) == 2:
            noop = _is_scalar(node.args[1], 1) and _same_tensor_type(src, node)
        elif node.target is aten.add.Tensor and len(node.args) == 2 and not node.kwargs:
            noop = _is_scalar(node.args[1], 0) and _same_tensor_type(src, node)
        else:
            noop = False
        if noop:
            replace(node, src)
            count += 1
    return count


def _same_strides(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    """Whether ``b`` lays its elements out as ``a`` does. ``contiguous()`` of a permuted tensor
    copies it into a new layout that a later ``view`` relies on (MPNet, DeBERTa-v2), so such a
    copy is kept. Strides are compared as expressions: symbolic sizes give symbolic strides."""
    va, vb = tensor_val(a), tensor_val(b)
    return va is not None and vb is not None and [str(s) for s in va.stride()] == [str(s) for s in vb.stride()]


def _is_scalar(value: object, expected: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == expected


def _same_tensor_type(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    va, vb = tensor_val(a), tensor_val(b)
    return (
        va is not None
        and vb is not None
        and va.dtype == vb.dtype
        and va.device == vb.device
        and va.dim() == vb.dim()
    )


def fuse_rms_norm(gm: torch.fx.GraphModule) -> int:
    """``x * rsqrt(mean(x**2, -1, keepdim) + eps) [* w]`` becomes ``aten.rms_norm(x, [d], w, eps)``."""
    count = 0
    for rsqrt in list(gm.graph.nodes):
        if rsqrt.op != "call_function" or rsqrt.target is not aten.rsqrt.default:
            continue
        matched = _match_rms(rsqrt)
        if matched is None:
            continue
        x, eps, normed = matched
        vx = tensor_val(x)
        weight, result = _rms_weight(normed, int(vx.shape[-1]))
        substitute(result, aten.rms_norm.default, (x, [int(vx.shape[-1])], weight, eps))
        count += 1
    gm.graph.eliminate_dead_code()
    return count


def _match_rms(rsqrt: torch.fx.Node) -> tuple[torch.fx.Node, float, torch.fx.Node] | None:
    add = rsqrt.args[0]
    if not (isinstance(add, torch.fx.Node) and add.target is aten.add.Tensor and isinstance(add.args[1], float)):
        return None
    mean = add.args[0]
    if not (isinstance(mean, torch.fx.Node) and mean.target is aten.mean.dim):
        return None
    dims = mean.args[1] if len(mean.args) > 1 else None
    keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    pow_ = mean.args[0]
    if not (isinstance(pow_, torch.fx.Node) and pow_.target is aten.pow.Tensor_Scalar and pow_.args[1] == 2):
        return None
    x = pow_.args[0]
    vx = tensor_val(x)
    if vx is None or not keepdim or dims is None or len(dims) != 1 or dims[0] % vx.dim() != vx.dim() - 1:
        return None
    for user in rsqrt.users:
        if user.target is aten.mul.Tensor and set(user.args[:2]) == {x, rsqrt}:
            return x, float(add.args[1]), user
    return None


def _rms_weight(normed: torch.fx.Node, dim: int) -> tuple[torch.fx.Node | None, torch.fx.Node]:
    """The 1-D gain multiplying the normalized tensor, if it is its only use."""
    users = list(normed.users)
    if len(users) == 1 and users[0].target is aten.mul.Tensor:
        mul = users[0]
        other = mul.args[1] if mul.args[0] is normed else mul.args[0]
        val = tensor_val(other)
        if isinstance(other, torch.fx.Node) and other.op == "get_attr" and val is not None \
                and val.dim() == 1 and int(val.shape[0]) == dim:
            return other, mul
    return None, normed


def fuse_tanh_gelu(gm: torch.fx.GraphModule) -> int:
    """``0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715*x**3)))`` becomes ``gelu(x, approximate="tanh")``."""
    count = 0
    for tanh in list(gm.graph.nodes):
        if tanh.op != "call_function" or tanh.target is not aten.tanh.default:
            continue
        x = _match_gelu_inner(tanh.args[0])
        users = list(tanh.users)
        if x is None or len(users) != 1 or users[0].target is not aten.add.Tensor \
                or not _is_scalar(users[0].args[1], 1.0):
            continue
        plus_one = users[0]
        final = next((u for u in plus_one.users if u.target is aten.mul.Tensor), None)
        if final is None or len(plus_one.users) != 1:
            continue
        half = final.args[0] if final.args[1] is plus_one else final.args[1]
        if not (isinstance(half, torch.fx.Node) and half.target is aten.mul.Tensor
                and half.args[0] is x and _is_close(half.args[1], 0.5)):
            continue
        substitute(final, aten.gelu.default, (x,), {"approximate": "tanh"})
        count += 1
    gm.graph.eliminate_dead_code()
    return count


def _match_gelu_inner(node: object) -> torch.fx.Node | None:
    if not (isinstance(node, torch.fx.Node) and node.target is aten.mul.Tensor
            and _is_close(node.args[1], math.sqrt(2 / math.pi))):
        return None
    inner = node.args[0]
    if not (isinstance(inner, torch.fx.Node) and inner.target is aten.add.Tensor):
        return None
    x, cubic = inner.args[0], inner.args[1]
    if not (isinstance(cubic, torch.fx.Node) and cubic.target is aten.mul.Tensor and _is_close(cubic.args[1], 0.044715)):
        return None
    pow_ = cubic.args[0]
    if isinstance(pow_, torch.fx.Node) and pow_.target is aten.pow.Tensor_Scalar and pow_.args[0] is x \
            and pow_.args[1] == 3:
        return x
    return None


def _is_close(value: object, expected: float) -> bool:
    return isinstance(value, float) and math.isclose(value, expected, rel_tol=1e-6)


_ALIASES = {
    aten.bmm.default: aten.matmul.default,
    aten._softmax.default: aten.softmax.int,
}


def normalize_aliases(gm: torch.fx.GraphModule) -> int:
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _ALIASES:
            if node.target is aten._softmax.default:
                node.args = node.args[:2]  # drop half_to_float (False for the float graphs we keep)
            node.target = _ALIASES[node.target]
            count += 1
    return count


def remove_dead_code(gm: torch.fx.GraphModule) -> int:
    """Remove unused nodes (e.g. an unused pooler) and the attributes only they referenced
    (the tensors of modules the graph calls, such as quantizers, stay)."""
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    called = tuple(str(n.target) + "." for n in gm.graph.nodes if n.op == "call_module")
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name not in used and not name.startswith(called):
            del_attr(gm, name)
    return before - len(gm.graph.nodes)


CANONICALIZATION_STEPS: tuple[tuple[str, Callable[[torch.fx.GraphModule], int]], ...] = (
    ("strip_export_artifacts", strip_export_artifacts),
    ("remove_noops", remove_noops),
    ("conv1d_to_linear", conv1d_to_linear),
    ("matmul_to_linear", matmul_to_linear),
    ("decompose_attention", decompose_attention),
    ("fuse_rms_norm", fuse_rms_norm),
    ("fuse_tanh_gelu", fuse_tanh_gelu),
    ("decompose_baddbmm", decompose_baddbmm),
    ("normalize_aliases", normalize_aliases),
    ("remove_dead_code", remove_dead_code),
)


def canonicalize(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Run every canonicalization step in place; returns the rewrite count of each step."""
    meta.record_module_paths(gm.graph)
    counts = {name: step(gm) for name, step in CANONICALIZATION_STEPS}
    gm.graph.lint()
    gm.recompile()
    return counts
