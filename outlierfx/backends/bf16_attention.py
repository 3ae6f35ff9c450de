"""Fused attention in bfloat16 behind int8 Q/K/V GEMMs (onednn, CPUs with native bf16).

Under ``linear-inputs`` attention stays float: one fused SDPA call per layer, which took 31-34%
of the int8 MiniLM's time on onednn (1.4 ms a layer, batch 8 x 128; torch.profiler). On a CPU
that runs bfloat16 natively (AMX here) the same kernel in bf16 takes about 1.07 ms. Where Q, K
and V come straight from int8 GEMMs with a float output (through views only), those GEMMs write
bf16 instead, so nothing is converted on the way in; the context comes back as float32 for the
quantizer that follows. bf16 keeps 8 bits of mantissa: about 0.4% per element, below the int8
step of the Q/K/V GEMMs' inputs (MiniLM cosine unchanged to 1e-4; README "Speed").

:func:`use_bf16_attention` rewrites the onednn eager form; :func:`use_bf16_attention_in_reference_form`
the decomposed form inductor compiles, where the Q/K/V GEMMs get the ``to(bfloat16)`` on their
dequantized input and weight that inductor's int8-mixed-bf16 patterns fold into one int8 GEMM
with a bf16 output.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.fx

from ..graph.ops import SDPA, is_call
from .int8_linear import QuantizedLinear
from .runtime import bf16_attention

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed
# ops that only reshape or select what the GEMM wrote (Q/K/V: split, view into heads, transpose)
_VIEWS = {aten.view.default, aten.reshape.default, aten.transpose.int, aten.permute.default, aten.split.Tensor,
          aten.split_with_sizes.default, aten.unsqueeze.default, torch.functional.split, operator.getitem}


def use_bf16_attention(gm: torch.fx.GraphModule) -> int:
    """Run each fused attention whose Q, K and V come (through views) from onednn int8 GEMMs with
    a plain float output, read by nothing but fused attention, as :func:`bf16_attention`; those
    GEMMs write bfloat16. Returns the number of attention calls converted."""
    def plain_onednn_gemm(node: torch.fx.Node) -> bool:
        if node.op != "call_module":
            return False
        module = gm.get_submodule(str(node.target))
        return isinstance(module, QuantizedLinear) and module.engine == "onednn" and module.out_qparams is None \
            and module.gelu is None and not module.residual and module.sink is None and module.sink_out is None

    def write_bf16(gemm: torch.fx.Node) -> None:
        gm.get_submodule(str(gemm.target)).out_dtype = torch.bfloat16

    return _convert(gm, plain_onednn_gemm, write_bf16)


def use_bf16_attention_in_reference_form(gm: torch.fx.GraphModule) -> int:
    """:func:`use_bf16_attention` for the decomposed int8 form (``Lower("inductor")``): each Q/K/V
    ``linear(dequantize(x), dequantize(W), b)`` takes its input, weight and bias in bfloat16,
    which inductor compiles to one int8 GEMM writing bf16. Returns the number of attention calls
    converted."""
    def int8_gemm(node: torch.fx.Node) -> bool:
        return is_call(node, aten.linear.default) and is_call(node.args[0], qd.dequantize_per_tensor.default) \
            and is_call(node.args[1], qd.dequantize_per_channel.default)

    def write_bf16(gemm: torch.fx.Node) -> None:
        with gm.graph.inserting_before(gemm):
            for i, arg in enumerate(gemm.args):
                if isinstance(arg, torch.fx.Node):
                    gemm.update_arg(i, gm.graph.call_function(aten._to_copy.default, (arg,),
                                                              {"dtype": torch.bfloat16}))

    return _convert(gm, int8_gemm, write_bf16)


def _convert(gm: torch.fx.GraphModule, is_gemm: Callable[[torch.fx.Node], bool],
             write_bf16: Callable[[torch.fx.Node], None]) -> int:
    """Attention calls whose Q, K and V come through views from GEMMs (``is_gemm``) read by
    nothing but such calls: ``write_bf16`` on each GEMM, the call to :func:`bf16_attention`."""
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is SDPA]
    sources = {call: [_gemm_behind_views(a, is_gemm) for a in call.args[:3]] for call in calls}
    candidates = {call for call, gemms in sources.items() if all(g is not None for g in gemms)}
    changed = True
    while changed:  # a GEMM may also feed attention calls that do not qualify, or other readers
        changed = False
        for call in list(candidates):
            if not all(read_by_attention_only(g, candidates) for g in sources[call]):
                candidates.discard(call)
                changed = True
    converted = set()
    for call in candidates:
        for gemm in sources[call]:
            if gemm not in converted:  # one GEMM may give Q, K and V (merged, or split by views)
                write_bf16(gemm)
                converted.add(gemm)
        call.target = bf16_attention
    if candidates:
        gm.recompile()
    return len(candidates)


def _gemm_behind_views(node: object, is_gemm: Callable[[torch.fx.Node], bool]) -> torch.fx.Node | None:
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _VIEWS:
        node = node.args[0]
    return node if isinstance(node, torch.fx.Node) and is_gemm(node) else None


def read_by_attention_only(gemm: torch.fx.Node, calls: set[torch.fx.Node]) -> bool:
    """Whether every reader of ``gemm`` (through views) is one of ``calls``, as its Q, K or V."""
    stack = [(gemm, user) for user in gemm.users]
    while stack:
        value, user = stack.pop()
        if user.op == "call_function" and user.target in _VIEWS:
            stack.extend((user, reader) for reader in user.users)
        elif user not in calls or value not in user.args[:3] or user.kwargs.get("attn_mask") is value:
            return False
    return True
