"""FuseAttention: decomposed attention with no quantizer inside becomes one fused SDPA call.

Canonicalization writes attention out as ``softmax((q * scale) @ k^T + bias) @ v`` so that
observers can see the scores and probabilities (HF's eager attention reads
``softmax((q @ k^T) * scale + bias) @ v``; both are matched). When the quantization policy puts
no enabled quantizer between the scores matmul and the context matmul (``linear-inputs``, for
example), those tensors never leave float and the chain is replaced by one
``aten.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)`` call: torch's fused
CPU kernel never materialises the ``[batch, heads, seq, seq]`` scores. Quantizers on q, k, v
(before the chain) and on the context (after it) stay where they are.

A chain holding an enabled quantizer (the ``full`` policy quantizes scores and probabilities),
or any node the fused kernel cannot express (an intermediate tensor read elsewhere, a scale
applied after the mask, two mask additions, broadcasting batch dimensions), is listed in the
plan with the reason and left alone. Disabled quantizers inside a chain are the identity and
are removed with it.

Grouped-query attention (Llama, Qwen, Mistral...) reads each key/value head from several query
heads; transformers expands K and V to one head per query head (``repeat_kv``: unsqueeze,
expand, reshape, a copy). Where K and V are such expansions of the same group size, the call
reads the unexpanded tensors with ``enable_gqa=True`` (the same function) and the copies go:
per decode step they copy the whole cache, twice per layer.

Numerics: the fused kernel computes the same function; only float rounding differs (about
1e-6 of the output's max on MiniLM with every quantizer disabled). Fully masked query rows (a
causal mask under left padding) agree too: canonicalization's mask bias, and HF's, is the
dtype's lowest *finite* value, with which both forms give the uniform average over the keys;
the fused kernel returns zeros only for ``-inf`` rows, where the decomposed graph gives NaN.
On a fake-quant graph, though, the quantizer after the context (the output projection's input
under ``linear-inputs``) turns a 1e-7 rounding difference into a whole quantization step
wherever a value sits near a rounding tie, and the next attention spreads that step over the
sequence: the end-to-end difference is of the order of the quantization noise, not of float
rounding (MiniLM, naive W8A8 linear-inputs: 8.9% of the max |output| at worst, token cosine
>= 0.98). So, like ``Lower``, the pass records its output error instead of enforcing one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.fx

from ..graph import meta
from ..graph.attrs import del_attr, set_attr
from ..graph.ops import SDPA, OpKind, op_kind, tensor_val
from ..quantizers.observers import FakeQuantize
from .base import GraphPass

aten = torch.ops.aten
STEP = "FuseAttention"


@dataclasses.dataclass(frozen=True)
class AttentionSite:
    """One attention chain, named by its softmax node.

    ``fused`` sites carry what the SDPA call reads (node names) and the nodes it replaces;
    the others carry ``reason`` (and the enabled quantizers inside the chain, if that is why)."""

    softmax: str
    module_path: str
    reason: str = ""  # empty when fused
    quantizers: tuple[str, ...] = ()  # enabled quantizers inside the chain
    query: str = ""
    key: str = ""  # the [.., S, E] key; "" when the chain multiplies by a k^T it does not transpose
    key_transposed: str = ""  # the [.., E, S] operand when ``key`` is ""
    value: str = ""
    mask: str = ""  # the additive bias node, "" without a mask
    scale: float = 1.0
    output: str = ""  # the context matmul whose readers the SDPA call takes over
    replaced: tuple[str, ...] = ()  # chain nodes, in graph order
    groups: int = 1  # query heads per key/value head, where ``key``/``value`` are unexpanded (enable_gqa)
    expansions: tuple[str, ...] = ()  # the K/V head expansions the call no longer reads, readers first

    @property
    def fused(self) -> bool:
        return not self.reason

    def describe(self) -> str:
        where = f"{self.softmax} ({self.module_path})" if self.module_path else self.softmax
        if self.fused:
            mask = f"mask {self.mask}" if self.mask else "no mask"
            grouped = f", grouped-query ({self.groups} query heads per key/value head)" if self.groups > 1 else ""
            return f"{where}: fused, scale {self.scale:.6g}, {mask}{grouped}, {len(self.replaced)} nodes replaced"
        return f"{where}: not fused: {self.reason}"


@dataclasses.dataclass(frozen=True)
class FuseAttentionPlan:
    sites: tuple[AttentionSite, ...]

    @property
    def fused(self) -> tuple[AttentionSite, ...]:
        return tuple(s for s in self.sites if s.fused)

    @property
    def skipped(self) -> tuple[AttentionSite, ...]:
        return tuple(s for s in self.sites if not s.fused)

    def summary(self) -> str:
        lines = [f"{len(self.fused)}/{len(self.sites)} attention chains fused into scaled_dot_product_attention"]
        lines += [f"  {site.describe()}" for site in self.sites]
        return "\n".join(lines)


class _NoMatch(Exception):
    """The chain around a softmax cannot become one SDPA call (the message says why)."""


class FuseAttention(GraphPass[FuseAttentionPlan]):
    """Replace each quantizer-free decomposed attention chain by one fused SDPA call.

    Run it on the fake-quant graph ``outlierfx.quantize`` returns (or any canonical graph)
    before :class:`~outlierfx.passes.lower.Lower` / :func:`~outlierfx.passes.lower.compile_int8`.
    """

    # Exact up to float rounding on the float graph, but quantizers downstream of a chain turn
    # rounding differences into quantization steps at ties (module docstring): the error is
    # recorded, not enforced. Check float equivalence with the quantizers disabled.
    output_rel_tol = None
    float_rel_tol = 1e-5  # what holds with every quantizer disabled (tests check it)

    def analyze(self, gm: torch.fx.GraphModule) -> FuseAttentionPlan:
        sites = []
        for node in gm.graph.nodes:
            if op_kind(node) is OpKind.SOFTMAX:
                sites.append(_match(gm, node))
        return FuseAttentionPlan(tuple(sites))

    def apply(self, gm: torch.fx.GraphModule, plan: FuseAttentionPlan) -> bool:
        nodes = {n.name: n for n in gm.graph.nodes}
        masks: dict[torch.fx.Node, torch.fx.Node] = {}  # one cast per mask: the layers share it (and its check)
        for site in plan.fused:
            output = nodes[site.output]
            graph = gm.graph
            with graph.inserting_before(output):
                if site.key:
                    key = nodes[site.key]
                else:
                    key = graph.call_function(aten.transpose.int, (nodes[site.key_transposed], -2, -1))
                    meta.inherit(key, output, STEP)
                kwargs: dict[str, object] = {"scale": site.scale}
                if site.mask:
                    mask = nodes[site.mask]
                    if mask not in masks:
                        masks[mask] = _mask_in_graph_dtype(gm, mask, output)
                    kwargs = {"attn_mask": masks[mask], **kwargs}
                if site.groups > 1:
                    kwargs["enable_gqa"] = True
                fused = graph.call_function(SDPA, (nodes[site.query], key, nodes[site.value]), kwargs)
            meta.inherit(fused, output, STEP)
            fused.meta["val"] = output.meta.get("val")
            output.replace_all_uses_with(fused)
            for name in reversed(site.replaced):
                node = nodes[name]
                graph.erase_node(node)
                if node.op == "call_module" and not any(
                        n.op == "call_module" and n.target == node.target for n in graph.nodes):
                    del_attr(gm, str(node.target))  # a disabled quantizer that was inside the chain
            for name in site.expansions:
                if not nodes[name].users:
                    graph.erase_node(nodes[name])
        return bool(plan.fused)


GRAPH_DTYPE = "outlierfx_float_dtype"
"""A 0-d float buffer of a fused graph: its dtype follows the graph through ``.to()``/``.double()``."""


def _mask_in_graph_dtype(gm: torch.fx.GraphModule, mask: torch.fx.Node, output: torch.fx.Node) -> torch.fx.Node:
    """A float mask in the dtype the graph computes in, whatever it is converted to later.

    The decomposed chain added the mask to the scores, and type promotion followed any
    ``.double()``; a mask built with a dtype fixed at capture (the cached decoder's float32
    bias) stays float32 there, and torch 2.13's fused kernel given float64 queries and a
    float32 mask silently returns wrong values (a saved SmolLM2 in float64: perplexity 1022).
    The dtype comes from a buffer, not from the queries: a second reader of a Q GEMM's output
    would stop it feeding attention alone (bf16 attention, merged Q/K/V GEMMs). ``type_as``
    costs nothing where the dtypes agree; a boolean mask keeps its meaning."""
    value = tensor_val(mask)
    if value is not None and not value.is_floating_point():
        return mask
    if not hasattr(gm, GRAPH_DTYPE):
        set_attr(gm, GRAPH_DTYPE, torch.zeros((), dtype=value.dtype if value is not None else torch.float32))
    dtype = gm.graph.get_attr(GRAPH_DTYPE)
    cast = gm.graph.call_function(aten.type_as.default, (mask, dtype))
    for node in (dtype, cast):
        meta.inherit(node, output, STEP)
    if value is not None:
        cast.meta["val"] = value
    return cast


# -- matching --------------------------------------------------------------------------------

def _match(gm: torch.fx.GraphModule, softmax: torch.fx.Node) -> AttentionSite:
    path = meta.module_path(softmax)
    quantizers: list[str] = []
    try:
        site = _match_chain(gm, softmax, quantizers)
    except _NoMatch as exc:
        return AttentionSite(softmax.name, path, reason=str(exc), quantizers=tuple(quantizers))
    if quantizers:
        names = ", ".join(quantizers)
        return AttentionSite(softmax.name, path, reason=f"quantized inside the chain by {names}",
                             quantizers=tuple(quantizers))
    return dataclasses.replace(site, module_path=path)


def _quantizer(gm: torch.fx.GraphModule, node: torch.fx.Node, quantizers: list[str]) -> bool:
    """Whether ``node`` is a FakeQuantize (its name is noted if it is enabled); other modules
    (e.g. observers of an uncalibrated graph) cannot be inside a fused chain."""
    if node.op != "call_module":
        return False
    module = gm.get_submodule(str(node.target))
    if not isinstance(module, FakeQuantize):
        raise _NoMatch(f"{type(module).__name__} {node.name} sits inside the chain")
    if module.enabled:
        quantizers.append(str(node.target))
    return True


def _scalar(value: object) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _only_user(node: torch.fx.Node) -> torch.fx.Node:
    if len(node.users) != 1:
        readers = ", ".join(u.name for u in node.users) or "nothing"
        raise _NoMatch(f"{node.name} is read outside the chain (by {readers})")
    return next(iter(node.users))


def _match_chain(gm: torch.fx.GraphModule, softmax: torch.fx.Node, quantizers: list[str]) -> AttentionSite:
    scores_in = softmax.args[0]
    val = tensor_val(scores_in)
    if val is None or val.dim() < 2 or not val.dtype.is_floating_point:
        raise _NoMatch("the softmax input is not a float tensor of known shape")
    dim = softmax.args[1] if len(softmax.args) > 1 else softmax.kwargs.get("dim")
    dtype = softmax.args[2] if len(softmax.args) > 2 else softmax.kwargs.get("dtype")
    if not isinstance(dim, int) or dim % val.dim() != val.dim() - 1:
        raise _NoMatch("the softmax is not over the last axis")
    if dtype is not None and dtype != val.dtype:
        raise _NoMatch(f"the softmax casts to {dtype}")
    replaced = [softmax]

    # backwards: softmax <- [mask add] <- [scale] <- scores matmul (quantizers anywhere)
    mask: torch.fx.Node | None = None
    scale = 1.0
    scaled_by = ""
    node = scores_in
    while True:
        if not isinstance(node, torch.fx.Node):
            raise _NoMatch("the softmax does not read a q @ k^T product")
        _only_user(node)
        if _quantizer(gm, node, quantizers):
            replaced.append(node)
            node = node.args[0]
        elif op_kind(node) is OpKind.MATMUL:
            break
        elif op_kind(node) is OpKind.ADD and len(node.args) == 2 and not node.kwargs:
            if scaled_by:
                raise _NoMatch(f"the scale {scaled_by} is applied after the mask {node.name}")
            if mask is not None:
                raise _NoMatch("more than one mask is added to the scores")
            operand, mask = _split_mask(node)
            replaced.append(node)
            node = operand
        elif node.op == "call_function" and node.target in (aten.mul.Tensor, aten.div.Tensor) \
                and len(node.args) == 2 and not node.kwargs and _scalar(node.args[1]) is not None:
            factor = _scalar(node.args[1])
            scale = scale * factor if node.target is aten.mul.Tensor else scale / factor
            scaled_by = node.name
            replaced.append(node)
            node = node.args[0]
        else:
            raise _NoMatch(f"{node.name} ({node.target}) lies between the scores matmul and the softmax")
    scores = node
    replaced.append(scores)
    a, b = scores.args[0], scores.args[1]
    query = a
    if isinstance(a, torch.fx.Node) and a.op == "call_function" and a.target in (aten.mul.Tensor, aten.div.Tensor) \
            and len(a.args) == 2 and not a.kwargs and _scalar(a.args[1]) is not None and len(a.users) == 1:
        factor = _scalar(a.args[1])
        scale = scale * factor if a.target is aten.mul.Tensor else scale / factor
        replaced.append(a)
        query = a.args[0]
    key, key_transposed = "", ""
    if isinstance(b, torch.fx.Node) and b.op == "call_function" and b.target is aten.transpose.int \
            and _swaps_last_two(b):
        key = b.args[0].name
        if len(b.users) == 1:
            replaced.append(b)
    elif isinstance(b, torch.fx.Node):
        key_transposed = b.name
    else:
        raise _NoMatch("the scores matmul does not read tensors")

    # forwards: softmax -> [quantizers] -> context matmul
    node = softmax
    while True:
        user = _only_user(node)
        if _quantizer(gm, user, quantizers):
            replaced.append(user)
            node = user
        elif op_kind(user) is OpKind.MATMUL and user.args[0] is node and user.args[1] is not node:
            break
        else:
            raise _NoMatch(f"the probabilities are read by {user.name} ({user.target}), not a context matmul")
    context = user
    replaced.append(context)
    value = context.args[1]

    _check_shapes(query, b, value, scores, mask)
    order = {n: i for i, n in enumerate(softmax.graph.nodes)}
    groups, expansions = 1, ()
    grouped_key = _unexpanded_heads(b.args[0]) if key else None
    grouped_value = _unexpanded_heads(value)
    if grouped_key and grouped_value and grouped_key[1] == grouped_value[1]:
        key, value = grouped_key[0].name, grouped_value[0]
        groups, expansions = grouped_key[1], grouped_key[2] + grouped_value[2]
    return AttentionSite(
        softmax.name, "", query=query.name, key=key, key_transposed=key_transposed, value=value.name,
        mask=mask.name if mask is not None else "", scale=scale, output=context.name,
        replaced=tuple(n.name for n in sorted(replaced, key=order.__getitem__)), groups=groups,
        expansions=tuple(n.name for n in expansions),
    )


_RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)


def _unexpanded_heads(node: torch.fx.Node) -> tuple[torch.fx.Node, int, tuple[torch.fx.Node, ...]] | None:
    """``(kv, groups, expansion nodes, readers first)`` where ``node`` is transformers'
    ``repeat_kv(kv, groups)``: ``kv [B, Hkv, S, D]`` (behind identity slices) unsqueezed at axis 2,
    expanded to ``[B, Hkv, groups, S, D]`` and reshaped to ``[B, Hkv * groups, S, D]``, query head
    ``h`` reading key/value head ``h // groups`` as ``enable_gqa`` does; else None."""
    chain = [node]
    if not (node.op == "call_function" and node.target in _RESHAPES):
        return None
    expand = node.args[0]
    if not (isinstance(expand, torch.fx.Node) and expand.op == "call_function" and expand.target is aten.expand.default):
        return None
    chain.append(expand)
    inner = _through_identity_slices(expand.args[0], chain)
    if not (inner.op == "call_function" and inner.target is aten.unsqueeze.default and inner.args[1] == 2):
        return None
    chain.append(inner)
    source = _through_identity_slices(inner.args[0], chain)
    kv, expanded, out = tensor_val(source), tensor_val(expand), tensor_val(node)
    if kv is None or expanded is None or out is None or kv.dim() != 4 or expanded.dim() != 5 or out.dim() != 4:
        return None
    batch, heads, seq, dim = kv.shape
    groups = expanded.shape[2]
    want = [(expanded.shape, (batch, heads, groups, seq, dim)), (out.shape, (batch, heads * groups, seq, dim))]
    if not all(_same_shape(a, b) for a, b in want):
        return None
    try:
        if int(groups) < 2:
            return None
    except (TypeError, ValueError, RuntimeError):
        return None
    return source, int(groups), tuple(chain)


def _through_identity_slices(node: torch.fx.Node, chain: list[torch.fx.Node]) -> torch.fx.Node:
    """``node`` past any ``aten.slice`` that keeps its whole input (``x[:, :, None]`` writes them),
    each one appended to ``chain``."""
    while node.op == "call_function" and node.target is aten.slice.Tensor:
        before, after = tensor_val(node.args[0]), tensor_val(node)
        step = node.args[4] if len(node.args) > 4 else 1
        if before is None or after is None or step != 1 or not _same_shape(before.shape, after.shape):
            break
        chain.append(node)
        node = node.args[0]
    return node


def _swaps_last_two(transpose: torch.fx.Node) -> bool:
    val = tensor_val(transpose.args[0])
    if val is None or val.dim() < 2:
        return False
    dims = {int(d) % val.dim() for d in transpose.args[1:3]}
    return dims == {val.dim() - 2, val.dim() - 1}


def _split_mask(add: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node]:
    """(scores operand, mask operand) of a mask addition: the operand whose ancestry reaches a
    matmul through the chain's ops is the scores; the other one is the bias."""
    for i in (0, 1):
        operand, other = add.args[i], add.args[1 - i]
        if isinstance(operand, torch.fx.Node) and isinstance(other, torch.fx.Node) and _reaches_matmul(operand):
            out, scores, bias = tensor_val(add), tensor_val(operand), tensor_val(other)
            if out is None or scores is None or bias is None or not bias.dtype.is_floating_point:
                raise _NoMatch(f"the mask {other.name} is not a float tensor of known shape")
            if not _same_shape(out.shape, scores.shape):
                raise _NoMatch(f"the mask {other.name} broadcasts the scores to a larger shape")
            return operand, other
    raise _NoMatch(f"neither operand of {add.name} is a q @ k^T product")


def _reaches_matmul(node: torch.fx.Node) -> bool:
    for _ in range(8):
        if op_kind(node) is OpKind.MATMUL:
            return True
        if node.op == "call_module" or (node.op == "call_function" and node.target in (aten.mul.Tensor, aten.div.Tensor)):
            if not node.args or not isinstance(node.args[0], torch.fx.Node):
                return False
            node = node.args[0]
        else:
            return False
    return False


def _same_shape(a: Sequence[object], b: Sequence[object]) -> bool:
    """Whether two shapes (ints or symbolic sizes) have the same rank and sizes."""
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def _same(a: object, b: object) -> bool:
    try:
        return int(a) == int(b)  # type: ignore[call-overload]
    except (TypeError, ValueError, RuntimeError):
        return str(a) == str(b)


def _check_shapes(query: object, key_t: torch.fx.Node, value: object, scores: torch.fx.Node,
                  mask: torch.fx.Node | None) -> None:
    q, kt, v, s = tensor_val(query), tensor_val(key_t), tensor_val(value), tensor_val(scores)
    if q is None or kt is None or v is None or s is None:
        raise _NoMatch("q, k or v has no recorded shape")
    if not (q.dtype == kt.dtype == v.dtype and q.dtype.is_floating_point):
        raise _NoMatch("q, k and v are not float tensors of one dtype")
    if not (q.dim() == kt.dim() == v.dim() >= 3):
        raise _NoMatch("q, k and v are not batched tensors of one rank")
    batch = [q.shape[:-2], kt.shape[:-2], v.shape[:-2], s.shape[:-2]]
    if not all(_same_shape(b, batch[0]) for b in batch):
        raise _NoMatch("the matmuls broadcast batch dimensions (the fused kernel does not)")
    if not (_same(q.shape[-1], kt.shape[-2]) and _same(kt.shape[-1], v.shape[-2])):
        raise _NoMatch("q, k and v shapes do not chain")
    if mask is not None and tensor_val(mask).dtype != q.dtype:
        raise _NoMatch(f"the mask {mask.name} is {tensor_val(mask).dtype}, q is {q.dtype}")
