"""Canonicalization: rewrite an exported aten graph so that each concept is one node.

Steps, each a function ``(gm) -> number of rewrites``:
- strip export artifacts (guard modules, metadata asserts) and no-op casts/dropouts (a copy that
  changes the memory layout, ``contiguous()`` of a permuted tensor, is not a no-op);
- GPT-2 style ``Conv1D`` (view -> addmm -> view) becomes ``aten.linear``, and so does a Linear
  written as a matrix product with a stored weight (Falcon's ``x @ W.T + b``);
- ``scaled_dot_product_attention`` becomes matmul -> scale -> mask add -> softmax -> matmul, so
  attention scores and probabilities are tensors that observers can see;
- RMSNorm written out as pow/mean/rsqrt/mul becomes one ``aten.rms_norm``;
- a norm without gamma times a stored per-channel gain becomes a norm with that gain as its
  gamma, also when the gain is computed from a parameter (Gemma's ``1 + weight``): it is
  computed once into a new parameter;
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
from .attrs import del_attr, fetch_attr, set_attr, unique_attr_name
from .linear_forms import conv1d_to_linear, matmul_to_linear
from .ops import aten, tensor_val
from .rewrite import STEP, replace, substitute

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
    aten.type_as.default,  # Gemma's RMSNorm output ``.type_as(x)``: a no-op where the dtypes agree
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
    """``x * rsqrt(mean(x**2, -1, keepdim) + eps)`` becomes ``aten.rms_norm(x, [d], None, eps)``
    (a gain multiplying it is :func:`fold_norm_gain`'s)."""
    count = 0
    for rsqrt in list(gm.graph.nodes):
        if rsqrt.op != "call_function" or rsqrt.target is not aten.rsqrt.default:
            continue
        matched = _match_rms(rsqrt)
        if matched is None:
            continue
        x, eps, normed = matched
        substitute(normed, aten.rms_norm.default, (x, [int(tensor_val(x).shape[-1])], None, eps))
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


_NORMS_WITH_GAMMA_ARG = {aten.rms_norm.default: 2, aten.layer_norm.default: 2}
_GAIN_OPS = {aten.add.Tensor, aten.sub.Tensor, aten.to.dtype, aten._to_copy.default}
"""Ops a gain may be computed with from one stored tensor and scalars (Gemma: ``1.0 + w.float()``)."""


def fold_norm_gain(gm: torch.fx.GraphModule) -> int:
    """``norm(x) * g`` becomes ``norm(x, weight=g)`` for an rms_norm without gamma, or a
    layer_norm without gamma or beta, whose only use is that multiply by a 1-D ``g`` of the
    normalized size: a stored tensor, or a value computed from one stored tensor and scalars
    (Gemma's ``1 + weight``), which is computed here once and stored as a new parameter
    ``<weight>_gain`` (the user's parameter is never touched). Passes then see the gain as the
    norm's gamma (MigrateGamma, RotateResidual)."""
    count = 0
    for norm in list(gm.graph.nodes):
        index = _NORMS_WITH_GAMMA_ARG.get(norm.target) if norm.op == "call_function" else None
        if index is None or _arg(norm, index) is not None or (
                norm.target is aten.layer_norm.default and _arg(norm, 3) is not None):
            continue
        users = list(norm.users)
        if len(users) != 1 or users[0].target is not aten.mul.Tensor or len(users[0].args) != 2:
            continue
        mul = users[0]
        other = mul.args[1] if mul.args[0] is norm else mul.args[0]
        gain = _stored_gain(gm, other, norm)
        if gain is None:
            continue
        args = list(norm.args) + [None] * (index + 1 - len(norm.args))
        args[index] = gain
        substitute(mul, norm.target, tuple(args), dict(norm.kwargs))
        count += 1
    gm.graph.eliminate_dead_code()
    return count


def _arg(node: torch.fx.Node, index: int) -> object:
    names = ("input", "normalized_shape", "weight", "bias")
    return node.args[index] if len(node.args) > index else node.kwargs.get(names[index])


def _stored_gain(gm: torch.fx.GraphModule, gain: object, norm: torch.fx.Node) -> torch.fx.Node | None:
    """A ``get_attr`` holding ``gain`` if it is a 1-D tensor of the normalized size and the
    norm's dtype that is stored or computed from one stored tensor and scalars, else None."""
    val, normed = tensor_val(gain), tensor_val(norm)
    if not isinstance(gain, torch.fx.Node) or val is None or normed is None or val.dim() != 1 \
            or int(val.shape[0]) != int(normed.shape[-1]) or val.dtype != normed.dtype:
        return None
    if gain.op == "get_attr":
        return gain
    leaves: list[torch.fx.Node] = []
    value = _evaluate_gain(gm, gain, leaves)
    if value is _NOT_CONSTANT or len(set(leaves)) != 1:
        return None
    target = unique_attr_name(gm, f"{leaves[0].target}_gain")
    set_attr(gm, target, torch.nn.Parameter(value, requires_grad=False))
    with gm.graph.inserting_before(norm):
        stored = gm.graph.get_attr(target)
    stored.meta[meta.MODULE_PATH] = str(leaves[0].target)
    stored.meta[meta.CREATED_BY] = STEP
    stored.meta["val"] = val
    return stored


_NOT_CONSTANT = object()


def _evaluate_gain(gm: torch.fx.GraphModule, node: object, leaves: list[torch.fx.Node]) -> object:
    """The value of ``node`` if only ``_GAIN_OPS`` of stored tensors and scalars compute it
    (the stored tensors read are appended to ``leaves``), else ``_NOT_CONSTANT``."""
    if not isinstance(node, torch.fx.Node):
        return node if node is None or isinstance(node, (int, float, torch.dtype)) else _NOT_CONSTANT
    if node.op == "get_attr":
        leaves.append(node)
        return fetch_attr(gm, str(node.target)).detach()
    if node.op != "call_function" or node.target not in _GAIN_OPS:
        return _NOT_CONSTANT
    args = [_evaluate_gain(gm, a, leaves) for a in node.args]
    kwargs = {k: _evaluate_gain(gm, v, leaves) for k, v in node.kwargs.items()}
    if any(v is _NOT_CONSTANT for v in (*args, *kwargs.values())):
        return _NOT_CONSTANT
    with torch.no_grad():
        return node.target(*args, **kwargs)


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
    ("fold_norm_gain", fold_norm_gain),
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
