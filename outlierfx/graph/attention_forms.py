"""Fused attention ops become explicit, observable ops (a canonicalization step each)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.fx

from . import meta
from .ops import aten, tensor_val
from .rewrite import STEP, bind, replace


def decompose_attention(gm: torch.fx.GraphModule) -> int:
    """Rewrite fused scaled-dot-product attention into explicit, observable ops.

    scores = (q * scale) @ k^T; scores = scores + bias (mask); p = softmax(scores); out = p @ v.
    A boolean mask becomes an additive bias once per mask tensor (shared by all layers), using
    the dtype's lowest finite value rather than -inf so that no row turns into NaN. (Fused SDPA
    returns zeros for a query row whose keys are all masked, which only happens at padded
    queries with left padding; the decomposed graph gives a uniform average there instead.)
    """
    count = 0
    bias_of_mask: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.scaled_dot_product_attention.default:
            continue
        args = bind(node, ["query", "key", "value", "attn_mask", "dropout_p", "is_causal"],
                     {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False})
        q, k, v, mask = args["query"], args["key"], args["value"], args["attn_mask"]
        vq, vk = tensor_val(q), tensor_val(k)
        head_dim = int(vq.shape[-1])
        scale = args["scale"] if args["scale"] is not None else 1.0 / math.sqrt(head_dim)
        g = gm.graph
        with g.inserting_before(node):
            new_nodes = []

            def call(target: Callable, *a: object, **kw: object) -> torch.fx.Node:
                n = g.call_function(target, a, kw)
                new_nodes.append(n)
                return n

            if args["enable_gqa"]:
                groups = int(vq.shape[-3]) // int(vk.shape[-3])
                k = call(aten.repeat_interleave.self_int, k, groups, -3)
                v = call(aten.repeat_interleave.self_int, v, groups, -3)
            # Scaling q before the product is measurably closer to fused SDPA than scaling the
            # scores (MiniLM: 5.7e-6 vs 1.3e-5 of the output's max), and no less observable.
            scores = call(aten.matmul.default, call(aten.mul.Tensor, q, scale), call(aten.transpose.int, k, -2, -1))
            if args["is_causal"]:
                q_len = call(aten.sym_size.int, q, -2)
                k_len = call(aten.sym_size.int, k, -2)
                ones = call(aten.ones.default, [q_len, k_len], dtype=torch.bool, device=vq.device)
                causal = call(aten.tril.default, ones)
                scores = call(aten.add.Tensor, scores, _bool_mask_to_bias(call, causal, vq.dtype))
            if mask is not None:
                if tensor_val(mask).dtype == torch.bool:
                    if mask not in bias_of_mask:
                        # before the mask's next node, so the bias nodes stay in order
                        with g.inserting_before(mask.next):
                            bias_nodes: list[torch.fx.Node] = []

                            def call_after(target: Callable, *a: object, **kw: object) -> torch.fx.Node:
                                n = g.call_function(target, a, kw)
                                bias_nodes.append(n)
                                return n

                            bias_of_mask[mask] = _bool_mask_to_bias(call_after, mask, vq.dtype)
                            for n in bias_nodes:
                                meta.inherit(n, mask, STEP)
                    bias = bias_of_mask[mask]
                else:
                    bias = mask
                scores = call(aten.add.Tensor, scores, bias)
            probs = call(aten.softmax.int, scores, -1)
            if args["dropout_p"]:
                probs = call(aten.dropout.default, probs, args["dropout_p"], True)
            out = call(aten.matmul.default, probs, v)
        for n in new_nodes:
            meta.inherit(n, node, STEP)
        out.meta["val"] = node.meta.get("val")  # later rewrites read shapes before re-propagation
        replace(node, out)
        count += 1
    return count


def _bool_mask_to_bias(call: Callable, mask: torch.fx.Node, dtype: torch.dtype) -> torch.fx.Node:
    bias = call(aten.where.Scalar, mask, 0.0, torch.finfo(dtype).min)
    if dtype != torch.get_default_dtype():
        bias = call(aten.to.dtype, bias, dtype)
    return bias


def decompose_baddbmm(gm: torch.fx.GraphModule) -> int:
    """``baddbmm(bias, a, b, beta, alpha)`` becomes ``matmul(a, b) * alpha + bias * beta``.

    BLOOM computes its attention scores this way (the ALiBi bias added to ``q @ k^T``). The
    scores become a canonical matmul that observers see, and shape propagation no longer meets
    ``baddbmm``'s shape function, which takes only concrete sizes in torch 2.13.
    """
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.baddbmm.default:
            continue
        args = bind(node, ["bias", "batch1", "batch2"], {"beta": 1, "alpha": 1})
        g = gm.graph
        with g.inserting_before(node):
            new_nodes = [g.call_function(aten.matmul.default, (args["batch1"], args["batch2"]))]
            if args["alpha"] != 1:
                new_nodes.append(g.call_function(aten.mul.Tensor, (new_nodes[-1], args["alpha"])))
            scores, bias = new_nodes[-1], args["bias"]
            if args["beta"] != 1:
                bias = g.call_function(aten.mul.Tensor, (bias, args["beta"]))
                new_nodes.append(bias)
            new_nodes.append(g.call_function(aten.add.Tensor, (scores, bias)))
        for n in new_nodes:
            meta.inherit(n, node, STEP)
        new_nodes[-1].meta["val"] = node.meta.get("val")
        replace(node, new_nodes[-1])
        count += 1
    return count
