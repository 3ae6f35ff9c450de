"""Eager engines: the values float ops read, and in-place rewrites of the lowered graph.

A dequantize that float ops read becomes a dequantized copy of the int8 tensor (or, where there
is none, torch's quantized-tensor quantize/dequantize kernels, ~10x faster than its fused
fake-quantize kernel on attention-sized tensors); float fallbacks' weights are dequantized
once, at lowering; a per-channel scale the graph keeps (a Quadapter ``x * s`` on a GELU output,
a post-LN compensation) scales its temporary in place; fused attention skips an all-zero mask
at run time (:func:`~.runtime.mask_or_none`).
"""

from __future__ import annotations

import torch
import torch.fx

from ..errors import PassError
from ..graph import meta
from ..graph.attrs import fetch_attr, set_attr, unique_attr_name
from ..graph.ops import SDPA, is_call, tensor_val
from .grids import add_constant
from .int8_linear import QuantizedLinear
from .reference import NDIM, Q_TENSOR, STEP
from .runtime import mask_or_none, two_grid_codes, two_grid_dequantize

aten = torch.ops.aten


def float_view(gm: torch.fx.GraphModule, dq: torch.fx.Node, quantized: dict[torch.fx.Node, torch.fx.Node]) -> None:
    """A dequantize read by float ops: dequantize the int8 tensor if there is one (``quantized``:
    quantize node -> the node giving its quint8 tensor), else quantize and dequantize the float
    value with torch's quantized-tensor kernels."""
    q = dq.args[0]
    if not dq.users:
        return
    with gm.graph.inserting_before(dq):
        if q in quantized:
            new = gm.graph.call_method("dequantize", (quantized[q],))
        else:
            new = _quantize_dequantize(gm, q)
    meta.inherit(new, dq, STEP)
    dq.replace_all_uses_with(new)


def _quantize_dequantize(gm: torch.fx.GraphModule, q: torch.fx.Node) -> torch.fx.Node:
    graph = gm.graph
    per_tensor = q.target is Q_TENSOR
    x, *params = q.args
    qmin, qmax, dtype = params[-3:]
    full = (-128, 127) if dtype == torch.int8 else (0, 255)
    if (qmin, qmax) != full:  # a narrower grid (A6, A4): clamp at its ends first
        if not per_tensor:
            raise PassError("per-channel activation grids narrower than 8 bit have no integer kernel")
        scale, zero_point = params[0], params[1]
        x = graph.call_function(torch.clamp, (x, (qmin - zero_point) * scale, (qmax - zero_point) * scale))
    if not per_tensor:  # elementwise, as fake_quantize computes it: ~20x faster than quantize_per_channel
        return _channel_fake_quantize(gm, x, q.meta[NDIM], *params)
    qdtype = torch.qint8 if dtype == torch.int8 else torch.quint8
    quantized = graph.call_function(torch.quantize_per_tensor, (x, params[0], params[1], qdtype))
    return graph.call_method("dequantize", (quantized,))


def _channel_fake_quantize(gm: torch.fx.GraphModule, x: torch.fx.Node, ndim: int, scale: torch.fx.Node,
                           zero_point: torch.fx.Node, axis: int, qmin: int, qmax: int, dtype: torch.dtype
                           ) -> torch.fx.Node:
    scale_value = fetch_attr(gm, str(scale.target)).float()
    shape = [-1] + [1] * (ndim - 1 - axis)  # broadcast along ``axis``
    constants = {}
    for name, value in (("inverse_scale", 1.0 / scale_value), ("zero_point_float",
                        fetch_attr(gm, str(zero_point.target)).float()), ("scale_float", scale_value)):
        constants[name] = gm.graph.get_attr(add_constant(gm, f"{scale.target}_{name}", value.reshape(shape)))
    call = gm.graph.call_function
    codes = call(aten.clamp.default, (call(aten.add.Tensor, (call(aten.round.default, (
        call(aten.mul.Tensor, (x, constants["inverse_scale"])),)), constants["zero_point_float"])), qmin, qmax))
    return call(aten.mul.Tensor, (call(aten.sub.Tensor, (codes, constants["zero_point_float"])),
                                  constants["scale_float"]))


def constant_weight(gm: torch.fx.GraphModule, dq: torch.fx.Node) -> None:
    """A float fallback's weight: its int8 codes dequantized once, now, and stored."""
    codes, scale = (fetch_attr(gm, str(a.target)) for a in dq.args[:2])
    name = unique_attr_name(gm, str(dq.args[0].target) + "_dequantized")
    set_attr(gm, name, codes.float() * scale[:, None])
    with gm.graph.inserting_before(dq):
        new = gm.graph.get_attr(name)
    dq.replace_all_uses_with(new)


def scale_in_place(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    """``x * s`` with ``s`` a stored per-channel vector (a Quadapter scale the graph keeps,
    or its post-LN compensation) and ``x`` a fresh temporary nobody else reads (an int8
    GEMM's float output, a dequantized copy) becomes ``x.mul_(s)``: no new activation-sized
    tensor (on MiniLM ``smooth``, 0.345x -> 0.313x of FP32 latency, measured)."""
    if not is_call(node, aten.mul.Tensor) or len(node.args) != 2 or node.kwargs:
        return
    x, s = node.args
    if not (isinstance(x, torch.fx.Node) and isinstance(s, torch.fx.Node) and s.op == "get_attr"):
        return
    scale = fetch_attr(gm, str(s.target))
    channels = _fresh_float_channels(gm, x) if len(x.users) == 1 else None
    if channels is None and is_call(x, aten.layer_norm.default) and _read_before(gm, x, node):
        channels = int(x.args[1][-1])  # a post-LN shortcut's compensation, after the quantize read x
    if channels is None or scale.dtype != torch.float32 or tuple(scale.shape) != (channels,):
        return
    node.target = aten.mul_.Tensor


def _read_before(gm: torch.fx.GraphModule, x: torch.fx.Node, node: torch.fx.Node) -> bool:
    """Every other reader of ``x`` runs before ``node`` and makes a new tensor of it (codes,
    an int8 GEMM's output): scaling ``x`` in place at ``node`` changes nothing they see."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    others = [u for u in x.users if u is not node]
    return all(order[u] < order[node] and (
        u.target in (torch.quantize_per_tensor, two_grid_codes, Q_TENSOR)
        or (u.op == "call_module" and isinstance(gm.get_submodule(str(u.target)), QuantizedLinear)))
        for u in others)


def _fresh_float_channels(gm: torch.fx.GraphModule, node: torch.fx.Node) -> int | None:
    """The last-axis size of ``node``'s value if it is a new float32 tensor (an int8 GEMM's
    float output, or codes dequantized), else None."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        float_out = isinstance(module, QuantizedLinear) and module.out_qparams is None
        return module.out_features if float_out else None
    dequantized = (node.op == "call_function" and node.target is two_grid_dequantize) or (
        node.op == "call_method" and node.target == "dequantize")
    return _code_channels(gm, node.args[0]) if dequantized and isinstance(node.args[0], torch.fx.Node) else None


def _code_channels(gm: torch.fx.GraphModule, source: torch.fx.Node) -> int | None:
    """The last-axis size of int8 codes: the GEMM that produced them, or the float value
    they were quantized from (when its shape is recorded)."""
    if source.op == "call_module":
        module = gm.get_submodule(str(source.target))
        return module.out_features if isinstance(module, QuantizedLinear) else None
    if source.target in (torch.quantize_per_tensor, two_grid_codes):
        value = tensor_val(source.args[0])
        return int(value.shape[-1]) if value is not None and value.dim() > 0 else None
    return None


def skip_zero_masks(gm: torch.fx.GraphModule) -> None:
    """Fused attention reads its additive mask through :func:`mask_or_none`, once per mask."""
    checked: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in list(gm.graph.nodes):
        mask = node.kwargs.get("attn_mask") if is_call(node, SDPA) else None
        if not isinstance(mask, torch.fx.Node):
            continue
        if mask not in checked:
            with gm.graph.inserting_after(mask):
                checked[mask] = gm.graph.call_function(mask_or_none, (mask,))
        node.update_kwarg("attn_mask", checked[mask])
