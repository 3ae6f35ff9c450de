"""ConvertToFakeQuant: calibrated observers become quantize-dequantize modules, and Linear
weights are replaced by their quantized values (per the policy's weight spec).

The result simulates an integer backend: activations and weights take only values on their
integer grids. Biases stay float (backends keep them in int32 at scale s_x * s_w, which is
finer than any activation grid).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from ..errors import PassError
from ..graph import meta
from ..graph.attrs import fetch_attr, replace_input_tensor
from ..graph.ops import OpKind, op_kind
from ..quantizers.fake_quant import quantize_weight
from ..quantizers.observers import FakeQuantize, Observer
from ..quantizers.spec import Granularity, QuantSpec
from .base import GraphPass


@dataclasses.dataclass(frozen=True)
class ConvertPlan:
    activations: tuple[str, ...]  # observer module names
    weights: tuple[torch.fx.Node, ...]  # Linear nodes whose weight is quantized
    weight_spec: QuantSpec | None
    grouped: tuple[tuple[str, int, tuple[int, ...]], ...] = ()  # (quantizer, K, channel permutation)

    def summary(self) -> str:
        spec = self.weight_spec.describe() if self.weight_spec else "float"
        line = f"{len(self.activations)} activation quantizers; {len(self.weights)} Linear weights ({spec})"
        if self.grouped:
            line += f"; {len(self.grouped)} grouped (PEG, K={self.grouped[0][1]}), permutations in the JSON report"
        return line


class ConvertToFakeQuant(GraphPass[ConvertPlan]):
    output_rel_tol = None  # quantization changes numerics on purpose; the error is recorded

    def __init__(self, weight_spec: QuantSpec | None) -> None:
        self.weight_spec = weight_spec

    def analyze(self, gm: torch.fx.GraphModule) -> ConvertPlan:
        names = tuple(name for name, m in gm.named_children() if isinstance(m, Observer))
        for name in names:
            if not getattr(gm, name).calibrated:
                raise PassError(f"observer {name} is not calibrated; run calibrate() before converting")
        linears = tuple(n for n in gm.graph.nodes if op_kind(n) is OpKind.LINEAR and self.weight_spec is not None)
        grouped = tuple((name, getattr(gm, name).spec.groups, getattr(gm, name).permutation() or ())
                        for name in names if getattr(gm, name).spec.granularity is Granularity.PER_GROUP)
        return ConvertPlan(names, linears, self.weight_spec, grouped)

    def apply(self, gm: torch.fx.GraphModule, plan: ConvertPlan) -> bool:
        for name in plan.activations:
            setattr(gm, name, FakeQuantize.from_observer(getattr(gm, name)))
        quantized: dict[str, torch.Tensor] = {}  # a tied weight is quantized once
        for linear in plan.weights:
            weight_node = linear.args[1]
            target = str(weight_node.target)
            if target not in quantized:
                quantized[target] = quantize_weight(fetch_attr(gm, target), plan.weight_spec)[0]
            replace_input_tensor(gm, linear, weight_node, quantized[target], "_quantized")
            linear.meta[meta.CREATED_BY] = linear.meta.get(meta.CREATED_BY, type(self).__name__)
        return bool(plan.activations or plan.weights)
