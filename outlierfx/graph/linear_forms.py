"""Linears written in other forms become ``aten.linear`` (a canonicalization step each).

GPT-2's ``Conv1D`` exports as view -> addmm -> view with an ``[in, out]`` weight; Falcon's
``FalconLinear`` computes ``x @ W.T + b``. Each becomes one ``aten.linear`` node, so every pass
that works on Linears (observers, smoothing, GPTQ, lowering) sees it. Nothing matches module
names: the rules look at ops, stored tensors and shapes only.
"""

from __future__ import annotations

import torch
import torch.fx

from . import meta
from .attrs import fetch_attr, set_attr, unique_attr_name
from .ops import aten, same_size, tensor_val
from .rewrite import STEP, substitute


def conv1d_to_linear(gm: torch.fx.GraphModule) -> int:
    """``view(x, [-1, n]) -> addmm(b, ., W) -> view(., [..., m])`` becomes ``linear(x, W.T, b)``.

    This is how GPT-2's ``Conv1D`` exports. The transposed weight is stored once as a new
    attribute, so the user's parameter is never touched.
    """
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.addmm.default, aten.mm.default):
            continue
        has_bias = node.target is aten.addmm.default
        if has_bias and (len(node.args) != 3 or node.kwargs):
            continue  # beta/alpha scaling is not a plain Linear
        flat, weight = (node.args[1], node.args[2]) if has_bias else (node.args[0], node.args[1])
        bias = node.args[0] if has_bias else None
        if not (isinstance(weight, torch.fx.Node) and weight.op == "get_attr"):
            continue
        if not (isinstance(flat, torch.fx.Node) and flat.target in (aten.view.default, aten.reshape.default)):
            continue
        x = flat.args[0]
        unflat = list(node.users)
        if len(unflat) != 1 or unflat[0].target not in (aten.view.default, aten.reshape.default):
            continue
        out = unflat[0]
        vx, vout = tensor_val(x), tensor_val(out)
        if vx is None or vout is None or vx.dim() != vout.dim() or vx.dim() < 2:
            continue
        with gm.graph.inserting_before(node):
            w_t = _transposed_copy(gm, weight)
            linear = gm.graph.call_function(aten.linear.default, (x, w_t, bias) if bias is not None else (x, w_t))
        meta.inherit(linear, node, STEP)
        linear.meta["val"] = out.meta.get("val")
        out.replace_all_uses_with(linear)
        gm.graph.erase_node(out)
        gm.graph.erase_node(node)
        count += 1
    return count


def _transposed_copy(gm: torch.fx.GraphModule, weight: torch.fx.Node) -> torch.fx.Node:
    """A ``get_attr`` of a new attribute holding ``weight``'s stored ``[in, out]`` matrix as the
    ``[out, in]`` one ``aten.linear`` takes (the user's parameter is never touched)."""
    w = fetch_attr(gm, str(weight.target))
    new_target = unique_attr_name(gm, f"{weight.target}_t")
    set_attr(gm, new_target, torch.nn.Parameter(w.detach().t().contiguous(), requires_grad=False))
    w_t = gm.graph.get_attr(new_target)
    w_t.meta[meta.MODULE_PATH] = str(weight.target)
    w_t.meta["val"] = tensor_val(weight).t().contiguous() if tensor_val(weight) is not None else None
    return w_t


_MATRIX_TRANSPOSES = (aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default)


def _stored_matrix(node: object) -> torch.fx.Node | None:
    """``node`` itself if it is a stored 2-D tensor (a ``get_attr``)."""
    val = tensor_val(node)
    return node if isinstance(node, torch.fx.Node) and node.op == "get_attr" and val is not None \
        and val.dim() == 2 else None


def _transposed_stored_matrix(node: object) -> torch.fx.Node | None:
    """The stored 2-D tensor ``W`` if ``node`` is ``W.T`` (``t``, ``.T``, ``transpose``, ``permute``)."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _MATRIX_TRANSPOSES):
        return None
    if node.target is aten.permute.default and list(node.args[1]) != [1, 0]:
        return None
    if node.target is aten.transpose.int and {d % 2 for d in node.args[1:3]} != {0, 1}:
        return None
    return _stored_matrix(node.args[0])


def matmul_to_linear(gm: torch.fx.GraphModule) -> int:
    """``x @ W.T [+ b]`` and ``x @ W`` with stored ``W`` (and ``b``) become ``linear(x, W, b)``.

    This is how Linears written as matrix products export (Falcon's ``FalconLinear`` computes
    ``input @ self.weight.T + self.bias``); a product with an activation (attention's
    ``q @ k^T``) has no stored operand and stays a matmul.
    """
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.matmul.default, aten.mm.default) \
                or len(node.args) != 2:
            continue
        x, product = node.args
        vx = tensor_val(x)
        weight, plain = _transposed_stored_matrix(product), None
        if weight is None:
            plain = _stored_matrix(product)
        if vx is None or vx.dim() < 1 or (weight is None and plain is None):
            continue
        in_features = tensor_val(weight if weight is not None else plain).shape[1 if weight is not None else 0]
        if not same_size(vx.shape[-1], in_features):
            continue
        with gm.graph.inserting_before(node):
            if weight is None:
                weight = _transposed_copy(gm, plain)
        bias, result = _linear_bias(node, int(tensor_val(weight).shape[0]))
        substitute(result, aten.linear.default, (x, weight, bias) if bias is not None else (x, weight))
        count += 1
    if count:
        gm.graph.eliminate_dead_code()
    return count


def _linear_bias(product: torch.fx.Node, out_features: int) -> tuple[torch.fx.Node | None, torch.fx.Node]:
    """The stored 1-D bias added to ``product`` as its only use, and the node whose value the
    Linear replaces (the add, or the product itself when there is no bias)."""
    users = list(product.users)
    if len(users) == 1 and users[0].target is aten.add.Tensor and len(users[0].args) == 2 and not users[0].kwargs:
        add = users[0]
        other = add.args[1] if add.args[0] is product else add.args[0]
        val = tensor_val(other)
        if isinstance(other, torch.fx.Node) and other.op == "get_attr" and val is not None and val.dim() == 1 \
                and int(val.shape[0]) == out_features and val.dtype == tensor_val(product).dtype:
            return other, add
    return None, product
