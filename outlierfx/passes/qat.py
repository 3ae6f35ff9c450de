"""QAT: quantization-aware training of the model's Linear weights, the baseline Quadapter is
measured against (Park et al. 2022 argue that QAT, learning every weight, overfits a small
fine-tuning set where Quadapter's few scales do not).

The training graph is the fake-quant model the conversion will produce, except that each Linear
reads ``Qw(W)`` computed from a trainable float ``W`` (weights re-quantized at every step, as
:class:`ConvertToFakeQuant` will quantize them, straight-through gradients); activation
quantizers keep their calibrated ranges (straight-through inside the range). The loss is the
language-modelling loss (next-token cross-entropy over real tokens) when the model returns
``logits`` and the batches carry ``input_ids``, otherwise the masked MSE of the outputs against
the unquantized model (distillation). Adam with a cosine schedule, a progress bar; data-parallel
under torch.distributed (:func:`outlierfx.passes.training.fit`).

Linear weights and biases learn; a weight tied to another reader (an LM head sharing the
embedding table) stays frozen so the tie survives. The pass writes the trained float weights
into new tensors (the input model is never touched); :class:`ConvertToFakeQuant` then quantizes
them. Run it after calibration, before conversion.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence

import torch
import torch.fx

from .. import distributed
from ..graph import meta
from ..graph.attrs import del_attr, fetch_attr, is_shared_attr, replace_input_tensor, set_attr, unique_attr_name
from ..graph.copy import copy_graph_module
from ..graph.ops import has_stored_weight
from ..quantizers.observers import FakeQuantize
from ..quantizers.spec import QuantSpec
from ..quantizers.trainable import TrainableActivationQuantizer, TrainableWeightQuantizer
from .base import GraphPass, require_calibrated_observers
from .convert_fake_quant import ConvertToFakeQuant, linear_weight_spec
from .training import Batch, fit, task_loss


@dataclasses.dataclass(frozen=True)
class QATPlan:
    weights: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]]  # Linear node -> trained (W, b)
    frozen: tuple[str, ...]  # Linears whose weight is tied to another reader
    parameters: int
    loss: str
    losses: tuple[float, ...]  # mean training loss per epoch (epoch 0: before training)
    steps: int
    seconds: float

    def summary(self) -> str:
        curve = " -> ".join(f"{v:.4g}" for v in self.losses)
        line = (f"QAT: {len(self.weights)} Linears ({self.parameters} parameters) trained {self.steps} steps on "
                f"the {self.loss} loss in {self.seconds:.1f}s; training loss by epoch {curve}")
        if self.frozen:
            line += f"; tied weights kept frozen: {list(self.frozen)}"
        return line


class QAT(GraphPass[QATPlan]):
    """Fake-quant fine-tuning of every (untied) Linear weight and bias (see the module docstring).

    Args:
        batches: training batches (keyword-input dicts).
        weight_spec, embedding_spec: the specs :class:`ConvertToFakeQuant` will use.
        epochs, lr: Adam over ``epochs`` passes through the batches, cosine-annealed from ``lr``.
        loss: ``"lm"``, ``"distill"`` or ``"auto"`` (lm when the model returns logits).
    """

    output_rel_tol = None  # the weights change on purpose
    trains_or_searches = True  # Adam steps on the weights

    def __init__(self, batches: Sequence[Batch], weight_spec: QuantSpec, embedding_spec: QuantSpec | None = None,
                 epochs: int = 2, lr: float = 1e-5, loss: str = "auto", progress: bool = False) -> None:
        if not batches:
            raise ValueError("QAT needs training batches")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        self.batches = [dict(b) for b in batches]
        self.weight_spec, self.embedding_spec = weight_spec, embedding_spec
        self.epochs, self.lr, self.loss, self.progress = epochs, lr, loss, progress

    def requires(self, gm: torch.fx.GraphModule) -> None:
        require_calibrated_observers(gm, "QAT")

    def analyze(self, gm: torch.fx.GraphModule) -> QATPlan:
        start = time.perf_counter()
        kind, loss = task_loss(gm, self.batches, self.loss)
        work, trained, frozen = self._training_graph(gm)
        params = [p for pair in trained.values() for p in pair if p is not None]
        steps = self.epochs * len(self.batches)
        losses = fit(params, lambda i: loss(work(**self.batches[i]), i), len(self.batches), steps, self.lr, "QAT",
                     self.progress)
        weights = {name: (w.detach().clone(), None if b is None else b.detach().clone())
                   for name, (w, b) in trained.items()}
        # every rank took the same averaged steps (data-parallel, see .training); rank 0's weights
        # everywhere still guarantee that ranks on different CPUs cannot drift apart
        distributed.broadcast_from_main([t for pair in weights.values() for t in pair if t is not None])
        return QATPlan(weights, tuple(frozen), sum(p.numel() for p in params), kind, tuple(losses), steps,
                       time.perf_counter() - start)

    def _training_graph(self, gm: torch.fx.GraphModule) -> tuple[
            torch.fx.GraphModule, dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter | None]], list[str]]:
        """The fake-quant graph with trainable copies of the Linear weights behind weight quantizers."""
        work = copy_graph_module(gm)  # tensors are shared with gm: every trained one gets its own copy
        trained, frozen = {}, []
        for node in list(work.graph.nodes):
            if not has_stored_weight(node):
                continue
            weight = node.args[1]
            tied = is_shared_attr(work, weight)
            if tied:
                frozen.append(node.name)
            else:
                w = torch.nn.Parameter(fetch_attr(work, str(weight.target)).detach().clone())
                set_attr(work, str(weight.target), w)
                bias = node.args[2] if len(node.args) > 2 and isinstance(node.args[2], torch.fx.Node) else None
                b = None
                if bias is not None and bias.op == "get_attr" and not is_shared_attr(work, bias):
                    b = torch.nn.Parameter(fetch_attr(work, str(bias.target)).detach().clone())
                    set_attr(work, str(bias.target), b)
                trained[node.name] = (w, b)
            name = unique_attr_name(work, f"outlierfx_qat_weight_quantizer_{node.name}")
            work.add_module(name, TrainableWeightQuantizer(linear_weight_spec(node, self.weight_spec)))
            with work.graph.inserting_before(node):
                quantized = work.graph.call_module(name, (weight,))
            meta.inherit(quantized, node, "QAT")
            node.replace_input_with(weight, quantized)
        work.recompile()
        # observers become fixed-range fake quantizers; embedding tables are quantized (frozen)
        work = ConvertToFakeQuant(None, self.embedding_spec)(work).graph_module
        for name, module in list(work.named_children()):
            if isinstance(module, FakeQuantize):
                setattr(work, name, TrainableActivationQuantizer(module))
        learnable = {id(q) for pair in trained.values() for q in pair if q is not None}
        for name, p in list(work.named_parameters()):
            if id(p) not in learnable:  # frozen: a detached view, so no gradient is built for it
                del_attr(work, name)
                set_attr(work, name, p.detach())
        return work, trained, frozen

    def apply(self, gm: torch.fx.GraphModule, plan: QATPlan) -> bool:
        by_name = {n.name: n for n in gm.graph.nodes}
        for name, (weight, bias) in plan.weights.items():
            node = by_name[name]
            replace_input_tensor(gm, node, node.args[1], weight, "_qat")
            if bias is not None:
                replace_input_tensor(gm, node, node.args[2], bias, "_qat")
        return bool(plan.weights)
