"""Per-tensor quantization error of a fake-quantized graph.

:func:`quantization_errors` hooks every :class:`FakeQuantize` module of a graph returned by
``outlierfx.quantize`` and measures, over calibration-like batches, what each quantizer does to
the tensor it receives: the signal-to-quantization-noise ratio (SQNR, dB), the relative MSE, the
largest absolute error and the share of values clipped at the ends of the integer grid.

The error is *local*: the input of each quantizer is the tensor the quantized graph really
computes there (upstream quantization noise included), and its error is the difference between
that input and its quantize-dequantize output. Padding is left out: the attention mask selects
real tokens, and real query/key pairs in attention tensors (see :func:`real_values`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.fx

from ..errors import DataError
from ..graph.view import GraphView
from .fake_quant import _broadcast
from .observers import FakeQuantize
from .spec import Granularity


@dataclasses.dataclass(frozen=True)
class TensorQuantError:
    module: str  # the FakeQuantize module's name in the graph
    tensor: str  # the user's module path of the quantized tensor (or its node name)
    block: str  # transformer block path (e.g. "encoder.layer.3"), "embeddings/input" or "output head"
    roles: tuple[str, ...]
    quantization: str  # QuantSpec.describe()
    elements: int  # values measured (padding excluded)
    sqnr_db: float  # 10 log10(sum x^2 / sum (q(x) - x)^2); inf when exact
    rel_mse: float  # sum (q(x) - x)^2 / sum x^2
    max_abs_error: float
    clipped_fraction: float  # values outside the representable range [(qmin - zp) s, (qmax - zp) s]

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("sqnr_db", "rel_mse"):
            if not math.isfinite(out[key]):
                out[key] = str(out[key])
        return out


def real_values(x: torch.Tensor, mask: torch.Tensor | None, roles: frozenset = frozenset()) -> torch.Tensor:
    """Boolean mask (``x``'s shape) of the values that belong to real tokens, given the
    attention mask ``[batch, seq]``: token rows of ``[batch, seq, ...]`` tensors, real
    query/key pairs of attention scores and probabilities ``[batch, heads, seq, seq]``, real
    query rows of the attention context ``[batch, heads, seq, head_dim]`` (told apart by role)."""
    if mask is None:
        return torch.ones_like(x, dtype=torch.bool)
    m = mask.bool()
    values = {getattr(r, "value", r) for r in roles}
    attention = x.dim() == 4 and x.shape[0] == m.shape[0] and x.shape[2] == m.shape[1]
    if attention and "attention_context" in values:
        return m[:, None, :, None].expand_as(x)
    if attention and x.shape[3] == m.shape[1] and (values & {"attention_scores", "attention_probs"} or not values):
        return (m[:, None, :, None] & m[:, None, None, :]).expand_as(x)
    if x.dim() >= 2 and tuple(x.shape[:2]) == tuple(m.shape):
        return m.reshape(*m.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return torch.ones_like(x, dtype=torch.bool)


class _Accumulator:
    def __init__(self, module: FakeQuantize) -> None:
        self.module = module
        self.mask: torch.Tensor | None = None  # attention mask of the batch running now
        self.signal = 0.0
        self.noise = 0.0
        self.max_abs = 0.0
        self.clipped = 0
        self.count = 0

    def __call__(self, module: FakeQuantize, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x = inputs[0].detach()
        real = real_values(x, self.mask, module.roles)
        values, diff = x[real].double(), (output.detach().double() - x.double())[real]
        if values.numel() == 0:
            return
        self.signal += float(values.pow(2).sum())
        self.noise += float(diff.pow(2).sum())
        self.max_abs = max(self.max_abs, float(diff.abs().max()))
        self.count += values.numel()
        if module.enabled:  # saturated: the integer code falls outside [qmin, qmax] before clamping
            spec, scale, zero_point = module.spec, module.scale, module.zero_point
            if spec.granularity is not Granularity.PER_TENSOR and x.dim():
                scale, zero_point = _broadcast(scale, x, spec.axis), _broadcast(zero_point, x, spec.axis)
            codes = torch.round(x / scale) + zero_point
            n = spec.sink_tokens
            if module.has_sink_grid and x.dim() >= 3 and x.shape[1] > n:  # the first tokens' own grid
                codes[:, :n] = torch.round(x[:, :n] / module.sink_scale) + module.sink_zero_point
            self.clipped += int(((codes < spec.qmin) | (codes > spec.qmax))[real].sum())

    def result(self, tensor_block: str) -> TensorQuantError:
        m = self.module
        if self.noise == 0.0:
            sqnr, rel = math.inf, 0.0
        elif self.signal == 0.0:
            sqnr, rel = -math.inf, math.inf
        else:
            rel = self.noise / self.signal
            sqnr = -10.0 * math.log10(rel)
        return TensorQuantError(
            module="",
            tensor=m.name,
            block=tensor_block,
            roles=tuple(sorted(getattr(r, "value", str(r)) for r in getattr(m, "roles", ()))),
            quantization=m.spec.describe() if m.enabled else "disabled (float)",
            elements=self.count,
            sqnr_db=sqnr,
            rel_mse=rel,
            max_abs_error=self.max_abs,
            clipped_fraction=self.clipped / self.count if self.count else 0.0,
        )


def _block_labels(gm: torch.fx.GraphModule, quantizer_nodes: dict[str, torch.fx.Node]) -> dict[str, str]:
    """The transformer block each quantized tensor belongs to, by module path (the graph view's
    blocks), else by position: before the first block or after the last one."""
    from ..graph import meta

    view = GraphView(gm)
    blocks = [b for b in view.blocks if b.path]
    first = min((view.order[n] for b in view.blocks for r in b.sublayers for n in (r.origin,)), default=None)
    labels = {}
    for name, node in quantizer_nodes.items():
        path = meta.module_path(node) or ""
        match = next((b.path for b in blocks if path == b.path or path.startswith(b.path + ".")), None)
        if match is None:
            match = "embeddings/input" if first is not None and view.order[node] <= first else "output head"
        labels[name] = match
    return labels


def quantization_errors(
    qmodel: torch.fx.GraphModule, batches: Iterable[Mapping[str, torch.Tensor]]
) -> list[TensorQuantError]:
    """SQNR, relative MSE, max error and clipped share of every activation quantizer of
    ``qmodel`` (a fake-quantized graph from ``outlierfx.quantize``) over ``batches`` (keyword
    inputs; padding, ``attention_mask == 0``, excluded). Rows come in graph order."""
    quantizers = {name: m for name, m in qmodel.named_children() if isinstance(m, FakeQuantize)}
    if not quantizers:
        raise DataError("the graph has no FakeQuantize modules; pass the model returned by outlierfx.quantize()")
    batches = list(batches)
    if not batches:
        raise DataError("no batches to measure the quantization error on")
    nodes = {str(n.target): n for n in qmodel.graph.nodes if n.op == "call_module" and str(n.target) in quantizers}
    accumulators = {name: _Accumulator(m) for name, m in quantizers.items()}
    handles = [m.register_forward_hook(accumulators[name]) for name, m in quantizers.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                for acc in accumulators.values():
                    acc.mask = batch.get("attention_mask")
                qmodel(**batch)
    finally:
        for handle in handles:
            handle.remove()
    labels = _block_labels(qmodel, nodes)
    order = {name: i for i, name in enumerate(nodes)}
    rows = []
    for name in sorted(accumulators, key=lambda n: order.get(n, len(order))):
        acc = accumulators[name]
        if acc.count == 0:
            continue  # never ran (dead code) or only padding
        rows.append(dataclasses.replace(acc.result(labels.get(name, "")), module=name))
    return rows
