"""Quadapter (Park et al. 2022): learned per-channel scales around activation quantizers.

At a norm -> Linear edge whose norm output is quantized, :class:`InsertQuadapter` puts a scale
pair around the quantizer Q: the quantizer reads ``x * s`` and every consumer reads
``Q(x * s) / s``. The ``1 / s`` goes where folding will put it, so the graph computes what the
folded model computes:

- a Linear consumer reads ``W * (1/s)`` (input columns), computed in the graph; its weight
  quantizer therefore sees the scaled weight, as it will after folding;
- a residual shortcut (post-LN, BERT) or the graph output reads ``Q(x * s) * (1/s)``, or
  ``(x * s) * (1/s)`` where the policy leaves it the float value (``linear-inputs``).

With ``explicit=True`` every other quantized Linear input (attention contexts, GELU/SwiGLU
outputs) gets a pair too: its producer cannot absorb s, so after folding ``x * s`` stays in the
graph as a multiply by a constant before the quantizer (1/s still folds into the Linear).

``s = exp(log_s)`` with one learnable ``log_s`` per channel, stored as the parameter
``outlierfx_quadapter_log_scale_<norm>``. With quantizers disabled (or observers, which return their input)
the graph equals the original up to fp32 rounding, for any s.

:class:`TrainQuadapter` learns only the scales, block by block: the loss is the MSE between the
FP32 block output and the fake-quantized block output on calibration batches (padding
excluded); the quantized block reads the output of the already-trained quantized blocks before it.
Model weights stay frozen (checked), activation quantizer ranges are re-estimated once after
initialisation (identity, or SmoothQuant-style ``s = max|W|^(1-a) / max|x|^a``) and then fixed.
Phase 2 (``end_to_end_steps``) then trains the same scales end to end on the task loss.

:class:`FoldQuadapter` moves s into the norm (gamma, beta) and 1/s into the Linear weights
(tied weights are untied, as in gamma migration); a post-LN shortcut keeps an explicit
per-channel multiply by 1/s. No learnable node is left.

The recipe order is: calibrate, ``InsertQuadapter``, ``TrainQuadapter``, ``FoldQuadapter``,
then ``ConvertToFakeQuant``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence

import torch
import torch.fx

from ..errors import PassError
from ..graph import meta
from ..graph.attrs import del_attr, fetch_attr, is_shared_attr, replace_input_tensor, set_attr, unique_attr_name
from ..graph.compare import masked_mse
from ..graph.copy import copy_graph_module
from ..graph.ops import (
    NORM_KINDS,
    OpKind,
    aten,
    is_kind,
    op_kind,
    preserves_last_axis,
    tensor_val,
    users_through_layout_ops,
)
from ..graph.probe import flatten_inputs, probe, run_nodes, values_read_after
from ..graph.view import GraphView
from ..quantizers.fake_quant import _broadcast, fake_quantize, quantize_weight
from ..quantizers.observers import FakeQuantize, Observer, observation_paused, token_mask
from ..quantizers.spec import QuantSpec, weight_spec
from .base import GraphPass
from .convert_fake_quant import ConvertToFakeQuant
from .detect_norms import _affine_params
from .scale_upstream import row_scalable_linear, scale_rows, verify_row_folds
from .training import fit, task_loss

NAME = "Quadapter"
SCALE_PREFIX = "outlierfx_quadapter_log_scale_"  # parameter names of the learnable log s
QUANTIZERS = (Observer, FakeQuantize)


# --------------------------------------------------------------------------- finding sites

@dataclasses.dataclass(frozen=True)
class QuadapterCandidate:
    norm: torch.fx.Node  # the producer: a norm, or (explicit sites) any node
    quantizer: torch.fx.Node  # call_module node of the norm output's Observer / FakeQuantize
    operand: torch.fx.Node  # what the quantizer reads (the norm, or a layout op of it)
    channels: int
    linears: tuple[torch.fx.Node, ...]  # absorb 1/s into their input columns
    compensated: tuple[tuple[torch.fx.Node, torch.fx.Node], ...]  # (consumer, operand) reading Q(xs)/s
    explicit: bool = False  # the producer cannot absorb s: folding keeps the multiply x * s


@dataclasses.dataclass(frozen=True)
class InsertQuadapterPlan:
    sites: tuple[QuadapterCandidate, ...]
    skipped: tuple[tuple[torch.fx.Node, str], ...]

    @property
    def parameters(self) -> int:
        return sum(s.channels for s in self.sites)

    def summary(self) -> str:
        linears = sum(len(s.linears) for s in self.sites)
        comp = sum(len(s.compensated) for s in self.sites)
        explicit = sum(s.explicit for s in self.sites)
        head = (f"Quadapter scales at {len(self.sites) - explicit} norm -> Linear edges and {explicit} other Linear "
                f"inputs (explicit x * s) ({self.parameters} parameters) feeding {linears} linears; {comp} "
                f"shortcut/output edges compensated")
        lines = [head]
        lines += [f"skipped {meta.module_path(n) or n.name}: {why}" for n, why in self.skipped]
        return "\n".join(lines)


def _is_quantizer(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), QUANTIZERS)


def _block_linears(view: GraphView) -> set[torch.fx.Node]:
    """Linears inside some residual branch (attention QKV/out, MLP): everything but the head."""
    found: set[torch.fx.Node] = set()
    for res in view.residual_adds:
        found |= {n for n in view.between(res.origin, res.branch) | {res.branch} if is_kind(n, OpKind.LINEAR)}
    return found


def producer_through_layout_ops(node: torch.fx.Node) -> torch.fx.Node:
    """The node whose values ``node`` shows, walking back through last-axis-preserving layout ops."""
    while node.args and isinstance(node.args[0], torch.fx.Node) and preserves_last_axis(node, node.args[0]):
        node = node.args[0]
    return node


def has_stored_weight(linear: torch.fx.Node) -> bool:
    """A Linear whose weight is a stored tensor (a ``get_attr``), which a pass can rewrite."""
    return is_kind(linear, OpKind.LINEAR) and isinstance(linear.args[1], torch.fx.Node) \
        and linear.args[1].op == "get_attr"


def _linear_consumers(quantizer: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The Linears reading ``quantizer`` (through layout ops) as input with a stored weight; None if
    anything else reads it."""
    linears = []
    for user, op in users_through_layout_ops(quantizer):
        if not (has_stored_weight(user) and user.args[0] is op):
            return None
        linears.append(user)
    return linears


def find_candidates(gm: torch.fx.GraphModule, include_head: bool = False,
                    explicit: bool = False, foldable_only: bool = False) -> InsertQuadapterPlan:
    """Norm outputs with a quantizer whose consumers can all take a per-channel scale; with
    ``explicit``, also every other quantized activation read only by Linears (the multiply x * s
    stays in the graph), or with ``foldable_only`` just those whose s folds into an upstream
    Linear's rows (:func:`row_scalable_linear`: attention contexts, SwiGLU products)."""
    view = GraphView(gm)
    shortcut_of = {r.add: r.shortcut for r in view.residual_adds}
    in_blocks = _block_linears(view) if not include_head else set()
    sites, skipped = [], []
    for norm in gm.graph.nodes:
        if op_kind(norm) not in NORM_KINDS:
            continue
        reads = list(users_through_layout_ops(norm))
        quantizers = [(user, op) for user, op in reads if _is_quantizer(gm, user)]
        if len(quantizers) != 1:
            skipped.append((norm, "its output is not quantized by exactly one quantizer"))
            continue
        quantizer, operand = quantizers[0]
        # float readers beside the quantizer (linear-inputs: a post-LN shortcut) read x * s * (1/s)
        float_reads = [(user, op) for user, op in reads if user is not quantizer]
        gamma, _ = _affine_params(norm)
        if gamma is not None and gamma.op != "get_attr":
            skipped.append((norm, "gamma is computed, not a parameter s can fold into"))
            continue
        linears, compensated, blocker = [], [], None
        for user, op in [*users_through_layout_ops(quantizer), *float_reads]:
            quantized = (user, op) not in float_reads
            if quantized and has_stored_weight(user) and user.args[0] is op:
                linears.append(user)
            elif (shortcut_of.get(user) is op or user.op == "output") and (quantized or op is operand):
                compensated.append((user, op))
            else:
                blocker = f"consumer {user.name} cannot absorb 1/s"
                break
        if blocker is None and not linears:
            blocker = "feeds no Linear"
        if blocker is None and not include_head and any(lin not in in_blocks for lin in linears):
            blocker = "feeds the head (outside the transformer blocks); include_head=True adds it"
        if blocker is not None:
            skipped.append((norm, blocker))
            continue
        channels = int(tensor_val(norm).shape[-1])
        sites.append(QuadapterCandidate(norm, quantizer, operand, channels, tuple(linears), tuple(compensated)))
    if explicit:
        taken = {site.quantizer for site in sites}
        for quantizer in gm.graph.nodes:
            if quantizer in taken or not _is_quantizer(gm, quantizer) or not isinstance(quantizer.args[0], torch.fx.Node):
                continue
            operand = quantizer.args[0]
            producer = producer_through_layout_ops(operand)
            if op_kind(producer) in NORM_KINDS or not any(is_kind(u, OpKind.LINEAR) for u, _ in
                                                          users_through_layout_ops(quantizer)):
                continue  # norms were handled above (or skipped with a reason); not a Linear input
            linears = _linear_consumers(quantizer)
            value = tensor_val(operand)
            if linears is None:
                skipped.append((producer, "a consumer other than a Linear reads its quantizer"))
            elif not include_head and any(lin not in in_blocks for lin in linears):
                skipped.append((producer, "feeds the head (outside the transformer blocks); include_head=True adds it"))
            elif value is None or value.dim() == 0:
                skipped.append((producer, "no recorded shape"))
            elif foldable_only and row_scalable_linear(operand, int(value.shape[-1])) is None:
                skipped.append((producer, "s would stay a multiply at run time (foldable_only)"))
            else:
                sites.append(QuadapterCandidate(producer, quantizer, operand, int(value.shape[-1]), tuple(linears),
                                                (), explicit=True))
    return InsertQuadapterPlan(tuple(sites), tuple(skipped))


@dataclasses.dataclass(frozen=True)
class _Site:
    """An inserted scale pair, found back from its ``log_s`` get_attr node."""

    target: str
    log_scale: torch.fx.Node
    scale: torch.fx.Node  # exp(log_s)
    input_mul: torch.fx.Node  # x * s, read by the quantizer
    inverse: torch.fx.Node  # 1 / s
    weight_muls: tuple[torch.fx.Node, ...]  # W * (1/s), read by a Linear as its weight
    compensations: tuple[torch.fx.Node, ...]  # Q(x s) * (1/s), or (x s) * (1/s), on shortcut / output edges

    @property
    def operand(self) -> torch.fx.Node:
        return self.input_mul.args[0]

    @property
    def producer(self) -> torch.fx.Node:
        return producer_through_layout_ops(self.operand)

    @property
    def explicit(self) -> bool:
        """The producer is no norm: folding keeps ``x * s`` as a multiply by a constant."""
        return op_kind(self.producer) not in NORM_KINDS

    @property
    def quantizer(self) -> torch.fx.Node:
        return next(u for u in self.input_mul.users if u.op == "call_module")  # beside float compensations


def inserted_sites(gm: torch.fx.GraphModule) -> list[_Site]:
    sites = []
    for node in gm.graph.nodes:
        if node.op != "get_attr" or not str(node.target).startswith(SCALE_PREFIX):
            continue
        (scale,) = node.users
        input_mul = next(u for u in scale.users if u.target is aten.mul.Tensor)
        inverse = next(u for u in scale.users if u.target is aten.reciprocal.default)
        weights = tuple(u for u in inverse.users if any(is_kind(c, OpKind.LINEAR) and c.args[1] is u for c in u.users))
        comps = tuple(u for u in inverse.users if u not in weights)
        sites.append(_Site(str(node.target), node, scale, input_mul, inverse, weights, comps))
    return sites


def scale_parameters(gm: torch.fx.GraphModule) -> dict[str, torch.nn.Parameter]:
    """The learnable ``log_s`` of every inserted site, by attribute name."""
    return {s.target: fetch_attr(gm, s.target) for s in inserted_sites(gm)}


# --------------------------------------------------------------------------- insertion

class InsertQuadapter(GraphPass[InsertQuadapterPlan]):
    """Insert identity-initialised scale pairs at every qualifying norm -> Linear edge.

    Runs on a graph with activation quantizers (observers, calibrated or not). ``include_head``
    also takes the final norm -> LM-head edge (the paper uses the block edges only). ``explicit``
    also takes every other quantized Linear input (GELU/SwiGLU outputs, attention contexts): its
    producer cannot absorb s, so ``x * s`` stays in the folded graph as a multiply by a constant
    (fused into the quantize step by inductor) while 1/s still folds into the Linear columns.
    ``foldable_only`` keeps just the explicit sites whose s can go into an upstream Linear's
    rows, so no multiply is left at run time (and every int8 GEMM keeps its fusions).
    """

    output_rel_tol = 1e-5  # x * s / s with s = 1, and exact for any s with quantizers off

    def __init__(self, include_head: bool = False, explicit: bool = False, foldable_only: bool = False) -> None:
        self.include_head = include_head
        self.explicit = explicit
        self.foldable_only = foldable_only

    def requires(self, gm: torch.fx.GraphModule) -> None:
        if not any(isinstance(m, QUANTIZERS) for m in gm.children()):
            raise PassError("Quadapter wraps activation quantizers; run InsertObservers first")
        if inserted_sites(gm):
            raise PassError("the graph already has Quadapter scales")

    def analyze(self, gm: torch.fx.GraphModule) -> InsertQuadapterPlan:
        return find_candidates(gm, self.include_head, self.explicit, self.foldable_only)

    def apply(self, gm: torch.fx.GraphModule, plan: InsertQuadapterPlan) -> bool:
        graph = gm.graph
        for site in plan.sites:
            target = unique_attr_name(gm, SCALE_PREFIX + site.norm.name)
            set_attr(gm, target, torch.nn.Parameter(torch.zeros(site.channels)))
            with graph.inserting_before(site.quantizer):
                log_s = graph.get_attr(target)
                scale = graph.call_function(aten.exp.default, (log_s,))
                scaled = graph.call_function(aten.mul.Tensor, (site.operand, scale))
                inverse = graph.call_function(aten.reciprocal.default, (scale,))
            for node in (log_s, scale, scaled, inverse):
                meta.inherit(node, site.norm, NAME)
            site.quantizer.replace_input_with(site.operand, scaled)
            for linear in site.linears:
                weight = linear.args[1]
                with graph.inserting_before(linear):
                    new = graph.call_function(aten.mul.Tensor, (weight, inverse))
                meta.inherit(new, linear, NAME)
                linear.replace_input_with(weight, new)
            for consumer, operand in site.compensated:
                with graph.inserting_before(consumer):  # a float reader reads x * s, like the quantizer
                    new = graph.call_function(aten.mul.Tensor, (scaled if operand is site.operand else operand, inverse))
                meta.inherit(new, site.norm, NAME)
                consumer.replace_input_with(operand, new)
        return bool(plan.sites)


# --------------------------------------------------------------------------- folding

@dataclasses.dataclass(frozen=True)
class FoldQuadapterPlan:
    folded: tuple[tuple[str, str, int], ...]  # (scale attribute, norm module path, linears)
    compensations: int
    tied_weights: tuple[str, ...]
    explicit: tuple[tuple[str, str, int], ...] = ()  # (scale attribute, producer, linears): x * s kept
    # (scale attribute, producer, upstream Linear's module path, its node): s went into that
    # Linear's output rows instead
    into_rows: tuple[tuple[str, str, str, str], ...] = ()

    def summary(self) -> str:
        line = (f"folded {len(self.folded)} Quadapter scale vectors into norm gamma/beta and "
                f"{sum(n for _, _, n in self.folded + self.explicit)} Linear weights; {self.compensations} explicit "
                f"shortcut/output multiplies by 1/s")
        if self.into_rows:
            line += f"; {len(self.into_rows)} scales folded into the output rows of an upstream Linear"
        kept = len(self.explicit) - len(self.into_rows)
        if kept:
            line += f"; {kept} scales stay as constant multiplies before their quantizers"
        if self.tied_weights:
            line += f"; untied {list(self.tied_weights)}"
        return line


class FoldQuadapter(GraphPass[FoldQuadapterPlan]):
    """s into the norm's gamma and beta, 1/s into the consuming Linears' input columns."""

    output_rel_tol = 1e-5

    def analyze(self, gm: torch.fx.GraphModule) -> FoldQuadapterPlan:
        folded, explicit, tied, comps = [], [], [], 0
        sites = inserted_sites(gm)
        rows = self._upstream_folds(gm, [s for s in sites if s.explicit])
        for site in sites:
            where = meta.module_path(site.producer) or site.producer.name
            (explicit if site.explicit else folded).append((site.target, where, len(site.weight_muls)))
            comps += len(site.compensations)
            for mul in site.weight_muls:
                weight = mul.args[0]
                if is_shared_attr(gm, weight):
                    tied.append(str(weight.target))
        into_rows = tuple((site.target, meta.module_path(site.producer) or site.producer.name,
                           meta.module_path(linear) or linear.name, linear.name) for site, linear in rows.values())
        return FoldQuadapterPlan(tuple(folded), comps, tuple(tied), tuple(explicit), into_rows)

    @staticmethod
    def _upstream_folds(gm: torch.fx.GraphModule, sites: list[_Site]) -> dict[str, tuple[_Site, torch.fx.Node]]:
        """Explicit sites whose s can go into an upstream Linear's output rows, checked on the
        example inputs (see :mod:`.scale_upstream`)."""
        inputs = gm.meta.get(meta.GM_EXAMPLE_INPUTS)
        if inputs is None:
            return {}
        candidates = {}
        for site in sites:
            linear = row_scalable_linear(site.operand, int(fetch_attr(gm, site.target).shape[0]))
            if linear is not None:
                candidates[site.target] = (site.input_mul, linear, torch.exp(fetch_attr(gm, site.target).detach()))
        good = verify_row_folds(gm, candidates, inputs)
        by_target = {s.target: s for s in sites}
        return {t: (by_target[t], candidates[t][1]) for t in candidates if t in good}

    def apply(self, gm: torch.fx.GraphModule, plan: FoldQuadapterPlan) -> bool:
        graph = gm.graph
        upstream = {t: node for t, _, _, node in plan.into_rows}  # scale attribute -> Linear node
        row_scales: list[tuple[str, torch.Tensor]] = []  # (upstream Linear node, s)
        for site in inserted_sites(gm):
            log_s = fetch_attr(gm, site.target).detach()
            scale = torch.exp(log_s)  # the same ops as the graph's, so the folded values are identical
            inverse = torch.reciprocal(scale)
            producer = site.producer  # before the fold erases x * s
            if site.target in upstream:  # s goes into the upstream Linear's rows, after this loop
                row_scales.append((upstream[site.target], scale))
                site.input_mul.replace_all_uses_with(site.operand)
                graph.erase_node(site.input_mul)
            elif site.explicit:  # x * s stays, with s a constant
                self._constant(gm, site.target, producer, "outlierfx_quadapter_scale_", scale, site.scale)
            else:
                self._fold_into_norm(gm, site, scale)
            for mul in site.weight_muls:
                weight = mul.args[0]
                (linear,) = mul.users
                linear.replace_input_with(mul, weight)
                graph.erase_node(mul)
                replace_input_tensor(gm, linear, weight, fetch_attr(gm, str(weight.target)).detach() * inverse,
                                     "_quadapter")
                if not weight.users:
                    graph.erase_node(weight)
            if site.compensations:
                self._constant(gm, site.target, producer, "outlierfx_quadapter_inverse_", inverse, site.inverse)
            for node in (site.inverse, site.scale, site.log_scale):
                graph.erase_node(node)
            del_attr(gm, site.target)
        # once every 1/s is in its Linear's columns, the upstream weights are stored tensors
        by_name = {n.name: n for n in graph.nodes}
        for name, scale in row_scales:
            scale_rows(gm, by_name[name], scale, "_quadapter")
        return bool(plan.folded or plan.explicit)

    @staticmethod
    def _constant(gm: torch.fx.GraphModule, scale_target: str, producer: torch.fx.Node, prefix: str,
                  value: torch.Tensor, replaces: torch.fx.Node) -> None:
        """Every reader of ``replaces`` reads the stored ``value`` instead."""
        target = unique_attr_name(gm, prefix + scale_target[len(SCALE_PREFIX):])
        set_attr(gm, target, value)
        with gm.graph.inserting_before(replaces):
            constant = gm.graph.get_attr(target)
        meta.inherit(constant, producer, NAME)
        replaces.replace_all_uses_with(constant)

    @staticmethod
    def _fold_into_norm(gm: torch.fx.GraphModule, site: _Site, scale: torch.Tensor) -> None:
        """s into the norm's gamma (created if it has none) and beta; the multiply x * s goes."""
        norm = site.producer
        gamma, beta = _affine_params(norm)
        if gamma is not None:
            replace_input_tensor(gm, norm, gamma, fetch_attr(gm, str(gamma.target)).detach() * scale, "_quadapter")
        else:  # no gamma (e.g. fully migrated by MigrateGamma): s becomes the norm's gamma
            target = unique_attr_name(gm, "outlierfx_quadapter_gamma_" + site.target[len(SCALE_PREFIX):])
            set_attr(gm, target, torch.nn.Parameter(scale, requires_grad=False))
            with gm.graph.inserting_before(norm):
                new_gamma = gm.graph.get_attr(target)
            meta.inherit(new_gamma, norm, NAME)
            norm.args = (*norm.args[:2], new_gamma, *norm.args[3:])
        if beta is not None:
            replace_input_tensor(gm, norm, beta, fetch_attr(gm, str(beta.target)).detach() * scale, "_quadapter")
        site.input_mul.replace_all_uses_with(site.operand)
        gm.graph.erase_node(site.input_mul)


# --------------------------------------------------------------------------- training graph

class _STEFakeQuantize(torch.autograd.Function):
    """Forward: exactly ``fake_quantize``. Backward: straight-through inside the grid's range."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, spec):  # type: ignore[no-untyped-def, override]
        y = fake_quantize(x, scale, zero_point, spec)
        step = scale if spec.granularity.value == "per_tensor" else _broadcast(scale, x, spec.axis)
        ctx.save_for_backward((y - x).abs() <= step * 0.5001)  # not clamped
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def, override]
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None


class TrainableActivationQuantizer(torch.nn.Module):
    """A :class:`FakeQuantize` that lets gradients through (straight-through estimator)."""

    def __init__(self, fq: FakeQuantize) -> None:
        super().__init__()
        self.fq = fq

    @property
    def enabled(self) -> bool:
        return self.fq.enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fq.enabled:
            return x
        return self.fq.on_grids(x, _STEFakeQuantize.apply)


class TrainableWeightQuantizer(torch.nn.Module):
    """Quantizes a computed weight (``W * 1/s``) exactly as ConvertToFakeQuant quantizes a stored one."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        self.spec = spec
        self.enabled = True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        _, scale, zero_point = quantize_weight(w, self.spec)
        return _STEFakeQuantize.apply(w, scale, zero_point, self.spec)


def unfolded_fake_quant(gm: torch.fx.GraphModule, weight: QuantSpec | None = None) -> torch.fx.GraphModule:
    """The fake-quant model of a graph with (unfolded) Quadapter scales, differentiable in s.

    Every observer becomes a fake quantizer, stored weights are quantized by
    :class:`ConvertToFakeQuant`, and the weights computed as ``W * 1/s`` get a weight quantizer in
    the graph. Its outputs are what the folded, converted model computes (up to fp32 rounding of
    the norm), and it shares the ``log_s`` parameters of ``gm``.
    """
    weight = weight if weight is not None else weight_spec(8)
    work = copy_graph_module(gm)
    pairs = []  # (W * 1/s node, its Linear), by name
    for site in inserted_sites(work):  # let ConvertToFakeQuant see the stored weight; W * 1/s stays
        for mul in site.weight_muls:
            (linear,) = mul.users
            pairs.append((mul.name, linear.name))
            linear.replace_input_with(mul, mul.args[0])
    converted = ConvertToFakeQuant(weight)(work).graph_module
    for name, module in list(converted.named_children()):
        if isinstance(module, FakeQuantize):
            setattr(converted, name, TrainableActivationQuantizer(module))
    by_name = {n.name: n for n in converted.graph.nodes}
    for mul_name, linear_name in pairs:
        mul, linear = by_name[mul_name], by_name[linear_name]
        stale = linear.args[1]  # the stored weight ConvertToFakeQuant quantized without 1/s
        name = unique_attr_name(converted, f"outlierfx_quadapter_weight_quantizer_{linear.name}")
        converted.add_module(name, TrainableWeightQuantizer(weight))
        with converted.graph.inserting_before(linear):
            quantized = converted.graph.call_module(name, (mul,))
        meta.inherit(quantized, linear, NAME)
        linear.replace_input_with(stale, quantized)
        if not stale.users:
            converted.graph.erase_node(stale)
            if not any(n.op == "get_attr" and n.target == stale.target for n in converted.graph.nodes):
                del_attr(converted, str(stale.target))
    converted.graph.lint()
    converted.recompile()
    return converted


# --------------------------------------------------------------------------- training

INITS = ("identity", "smoothquant")


@dataclasses.dataclass(frozen=True)
class BlockFit:
    block: int  # transformer block index (len(blocks) for the tail after the last block)
    sites: tuple[str, ...]
    loss_before: float  # MSE vs the FP32 block output, after initialisation
    loss_after: float
    steps: int
    stopped_early: bool  # plateau reached before max_steps


@dataclasses.dataclass(frozen=True)
class TrainQuadapterPlan:
    init: str
    alpha: float
    log_scales: Mapping[str, torch.Tensor]  # trained log s per scale attribute
    observers: Mapping[str, Observer]  # site quantizers re-estimated on x * s_init (fixed during training)
    blocks: tuple[BlockFit, ...]
    parameters: int
    weights_unchanged: bool
    seconds: float
    end_to_end: tuple[float, ...] = ()  # phase 2: task loss before, then per pass through the batches
    end_to_end_loss: str = ""

    def summary(self) -> str:
        phase2 = ""
        if self.end_to_end:
            curve = " -> ".join(f"{v:.4g}" for v in self.end_to_end)
            phase2 = f"; phase 2 end to end ({self.end_to_end_loss} loss): {curve}"
        before = sum(b.loss_before for b in self.blocks)
        after = sum(b.loss_after for b in self.blocks)
        steps = sum(b.steps for b in self.blocks)
        early = sum(b.stopped_early for b in self.blocks)
        return (f"trained {self.parameters} Quadapter scales ({self.init} init) block by block: summed block MSE "
                f"{before:.4g} -> {after:.4g} over {len(self.blocks)} blocks, {steps} steps ({early} stopped on "
                f"plateau){phase2} in {self.seconds:.1f}s; weights unchanged: {self.weights_unchanged}")


def _fingerprint(gm: torch.fx.GraphModule) -> dict[str, tuple[int, float, float]]:
    """Version counter and checksums of every model tensor (scales and quantizer state excluded)."""
    skip = {name for name, m in gm.named_modules() if isinstance(m, QUANTIZERS)}
    out = {}
    for name, t in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name.startswith(SCALE_PREFIX) or name.rsplit(".", 1)[0] in skip:
            continue
        d = t.detach().double()
        out[name] = (t._version, float(d.sum()), float(d.abs().sum()))
    return out


class _Stepper:
    """Runs a graph block by block on several batches, keeping only the values later nodes read."""

    def __init__(self, gm: torch.fx.GraphModule, inputs: Sequence[list]) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.position = {n.name: i for i, n in enumerate(self.nodes)}
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.caches = [dict(zip(placeholders, x)) for x in inputs]
        self.start = 0

    def segment(self, end: str) -> tuple[int, torch.fx.Node]:
        return self.start, self.nodes[self.position[end]]

    def advance(self, end: str) -> list[object]:
        """Values of node ``end`` per batch (no autograd); the caches move past it."""
        start, stop = self.segment(end)
        boundary = self.position[end] + 1
        live = values_read_after(self.gm, boundary)
        outs = []
        with torch.no_grad(), observation_paused():  # observers shared with the input graph record nothing
            for i, cache in enumerate(self.caches):
                env = run_nodes(self.gm, cache, start, stop)
                outs.append(env[stop])
                self.caches[i] = {n: env[n] for n in live}
        self.start = boundary
        return outs


class TrainQuadapter(GraphPass[TrainQuadapterPlan]):
    """Learn the inserted Quadapter scales block by block (see the module docstring).

    Args:
        batches: calibration batches (keyword-input dicts); the first ``max_batches`` are used.
        weight: the weight quantization the model will get (default: 8-bit per-channel symmetric).
        init: ``"identity"`` (s = 1) or ``"smoothquant"`` (``s = max|W|^(1-alpha) / max|x|^alpha``).
        end_to_end_steps, end_to_end_lr: phase 2 (off by default): after the block-wise phase, the
            scales learn end to end on the task loss (language modelling for models returning
            logits, otherwise the output MSE against the unquantized model), Adam with a cosine
            schedule over that many steps.
        lr, max_steps, patience, min_delta, check_every: Adam on log s, at most ``max_steps`` per
            block. Every ``check_every`` steps (at least one pass over the batches) the mean loss
            of those steps is compared with the best so far: ``patience`` windows in a row
            without a relative improvement of ``min_delta`` stop the block (plateau), keeping
            the scales of the best window. The scales kept are those with the lowest loss on the
            batches among the last step, the best window and the initialisation, so training never
            makes a block's loss worse.
    """

    output_rel_tol = 1e-5  # only s changes: with quantizers off the outputs stay the same

    def __init__(self, batches: Sequence[Mapping[str, torch.Tensor]], weight: QuantSpec | None = None,
                 init: str = "identity", alpha: float = 0.5, lr: float = 1e-2, max_steps: int = 200,
                 patience: int = 2, min_delta: float = 1e-3, check_every: int = 10, max_batches: int = 8,
                 end_to_end_steps: int = 0, end_to_end_lr: float = 1e-3, progress: bool = True) -> None:
        if not batches:
            raise ValueError("Quadapter training needs calibration batches")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.batches = [dict(b) for b in list(batches)[:max_batches]]
        self.weight = weight if weight is not None else weight_spec(8)
        self.init, self.alpha, self.lr = init, alpha, lr
        self.max_steps, self.patience, self.min_delta = max_steps, patience, min_delta
        self.check_every = check_every
        self.end_to_end_steps, self.end_to_end_lr = end_to_end_steps, end_to_end_lr
        self.progress = progress

    def requires(self, gm: torch.fx.GraphModule) -> None:
        if not inserted_sites(gm):
            raise PassError("no Quadapter scales in the graph; run InsertQuadapter first")
        for site in inserted_sites(gm):
            quantizer = gm.get_submodule(str(site.quantizer.target))
            if not isinstance(quantizer, Observer) or not quantizer.calibrated:
                raise PassError("Quadapter training needs calibrated observers (run calibrate() before it, "
                                "ConvertToFakeQuant after it)")

    def analyze(self, gm: torch.fx.GraphModule) -> TrainQuadapterPlan:
        start_time = time.perf_counter()
        fingerprint = _fingerprint(gm)
        work = copy_graph_module(gm)  # own scale parameters and site observers; tensors shared otherwise
        sites = inserted_sites(work)
        for site in sites:
            set_attr(work, site.target, torch.nn.Parameter(fetch_attr(gm, site.target).detach().clone()))
        inputs = [flatten_inputs(work, (), b) for b in self.batches]
        masks = [b.get("attention_mask") for b in self.batches]
        if self.init == "smoothquant":
            self._smoothquant_init(work, sites)
        observers = self._refresh_observers(work, sites)

        quantized = unfolded_fake_quant(work, self.weight)
        scales = scale_parameters(quantized)  # the same Parameter objects as work's
        for name, p in list(quantized.named_parameters()):
            if name not in scales:  # frozen weights: detached copies, so no gradient reaches them
                del_attr(quantized, name)
                set_attr(quantized, name, p.detach())

        reference = _Stepper(work, inputs)
        student = _Stepper(quantized, inputs)
        blocks = GraphView(quantized).blocks
        ends = [b.sublayers[-1].add.name for b in blocks]
        by_segment: dict[int, list[str]] = {}
        for site in inserted_sites(quantized):
            position = student.position[site.input_mul.name]
            index = next((i for i, end in enumerate(ends) if position <= student.position[end]), len(ends))
            by_segment.setdefault(index, []).append(site.target)
        output = quantized.graph.output_node().name
        segments = [(i, end) for i, end in enumerate(ends)] + ([(len(ends), output)] if len(ends) in by_segment else [])
        last = max(by_segment) if by_segment else -1

        fits = []
        iterator = segments
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            iterator = bar = tqdm(segments, desc="Quadapter", unit="block")
        for index, end in iterator:
            if index > last:
                break
            targets = reference.advance(end)
            if index not in by_segment:
                student.advance(end)
                continue
            block_fit = self._train_block(index, by_segment[index], scales, student, end, targets, masks)
            fits.append(block_fit)
            if bar is not None:
                bar.set_postfix(loss=f"{block_fit.loss_before:.3g}->{block_fit.loss_after:.3g}", steps=block_fit.steps)
        phase2, kind = [], ""
        if self.end_to_end_steps > 0:
            kind, loss = task_loss(work, self.batches)
            phase2 = fit(list(scales.values()), lambda i: loss(quantized(**self.batches[i]), i), len(self.batches),
                         self.end_to_end_steps, self.end_to_end_lr, "Quadapter phase 2", self.progress)
        unchanged = _fingerprint(gm) == fingerprint and all(
            p.grad is None for name, p in gm.named_parameters() if not name.startswith(SCALE_PREFIX))
        if not unchanged:
            raise PassError("Quadapter training changed a model weight; only the scales may change")
        return TrainQuadapterPlan(self.init, self.alpha, {t: p.detach().clone() for t, p in scales.items()}, observers,
                                  tuple(fits), sum(p.numel() for p in scales.values()), unchanged,
                                  time.perf_counter() - start_time, tuple(phase2), kind)

    def _train_block(self, index: int, targets_of: list[str], scales: Mapping[str, torch.nn.Parameter],
                     student: _Stepper, end: str, targets: list[object], masks: list) -> BlockFit:
        params = [scales[t] for t in targets_of]
        start, stop = student.segment(end)

        def loss_of(i: int) -> torch.Tensor:
            env = run_nodes(student.gm, student.caches[i], start, stop)
            return masked_mse(env[stop], targets[i], masks[i])

        with torch.no_grad():
            before = sum(float(loss_of(i)) for i in range(len(targets))) / len(targets)
        optimizer = torch.optim.Adam(params, lr=self.lr)
        initial = [p.detach().clone() for p in params]
        best, best_state, bad, steps, early = before, initial, 0, 0, False
        window = max(len(targets), self.check_every)
        running, count = 0.0, 0
        while steps < self.max_steps:
            loss = loss_of(steps % len(targets))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            running, count, steps = running + float(loss.detach()), count + 1, steps + 1
            if count < window:
                continue
            mean, running, count = running / count, 0.0, 0  # mean loss over the last window of steps
            if math.isfinite(mean) and mean < best * (1 - self.min_delta):
                best, best_state, bad = mean, [p.detach().clone() for p in params], 0
            else:
                bad += 1
                if bad >= self.patience:
                    early = True
                    break
        # keep the lowest exact loss among: the last step, the best window, the initialisation
        options = [([p.detach().clone() for p in params], None), (best_state, None), (initial, before)]
        with torch.no_grad():
            scored = []
            for state, known in options:
                if known is None:
                    for p, value in zip(params, state):
                        p.copy_(value)
                    known = sum(float(loss_of(i)) for i in range(len(targets))) / len(targets)
                scored.append((known, len(scored), state))
            _, _, chosen = min(scored, key=lambda item: item[:2])
            for p, value in zip(params, chosen):
                p.copy_(value)
        outs = student.advance(end)
        after = sum(float(masked_mse(o, t, m)) for o, t, m in zip(outs, targets, masks)) / len(targets)
        return BlockFit(index, tuple(targets_of), before, after, steps, early)

    def _smoothquant_init(self, work: torch.fx.GraphModule, sites: list[_Site]) -> None:
        x_max: dict[str, torch.Tensor] = {}

        def record(node: torch.fx.Node, value: torch.Tensor) -> None:
            rows = value.detach().abs().reshape(-1, value.shape[-1]).amax(0)
            x_max[node.name] = torch.maximum(x_max[node.name], rows) if node.name in x_max else rows

        operands = {s.operand for s in sites}
        with observation_paused():
            for batch in self.batches:
                probe(work, operands, ((), batch), record)
        with torch.no_grad():
            for site in sites:
                w_max = torch.stack([fetch_attr(work, str(m.args[0].target)).detach().abs().amax(0)
                                     for m in site.weight_muls]).amax(0)
                log_s = (1 - self.alpha) * w_max.clamp_min(1e-5).log() - self.alpha * \
                    x_max[site.operand.name].clamp_min(1e-5).log()
                fetch_attr(work, site.target).copy_(log_s - log_s.mean())  # the mean only rescales the range

    def _refresh_observers(self, work: torch.fx.GraphModule, sites: list[_Site]) -> dict[str, Observer]:
        """Fresh statistics for each site quantizer, on x * s (observers elsewhere are untouched)."""
        fresh = {}
        for site in sites:
            name = str(site.quantizer.target)
            old = work.get_submodule(name)
            fresh[name] = Observer(old.spec, old.name, old.roles)
            setattr(work, name, fresh[name])
        by_node = {site.input_mul: fresh[str(site.quantizer.target)] for site in sites}
        with observation_paused():
            for batch in self.batches:
                with token_mask(batch.get("attention_mask")):
                    probe(work, by_node, ((), batch), lambda node, value: by_node[node].observe(value))
        return fresh

    def apply(self, gm: torch.fx.GraphModule, plan: TrainQuadapterPlan) -> bool:
        for target, value in plan.log_scales.items():
            set_attr(gm, target, torch.nn.Parameter(value.clone()))
        for name, observer in plan.observers.items():
            setattr(gm, name, observer)
        return True
