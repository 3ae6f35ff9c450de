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

The recipe order is: calibrate, :class:`InsertQuadapter` (this module, which also finds the
inserted sites again for the passes after it),
:class:`~outlierfx.passes.train_quadapter.TrainQuadapter` (learns only the scales, block by
block), :class:`~outlierfx.passes.fold_quadapter.FoldQuadapter` (s into the norm's gamma and
beta, 1/s into the Linear weights; no learnable node is left), then ``ConvertToFakeQuant``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from ..errors import PassError
from ..graph import meta
from ..graph.attrs import fetch_attr, set_attr, unique_attr_name
from ..graph.ops import (
    NORM_KINDS,
    OpKind,
    aten,
    has_stored_weight,
    is_kind,
    op_kind,
    producer_through_layout_ops,
    tensor_val,
    users_through_layout_ops,
)
from ..graph.view import GraphView
from ..quantizers.observers import FakeQuantize, Observer
from .base import GraphPass
from .detect_norms import _affine_params
from .scale_upstream import row_scalable_linear

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
class ScaleSite:
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


def inserted_sites(gm: torch.fx.GraphModule) -> list[ScaleSite]:
    sites = []
    for node in gm.graph.nodes:
        if node.op != "get_attr" or not str(node.target).startswith(SCALE_PREFIX):
            continue
        (scale,) = node.users
        input_mul = next(u for u in scale.users if u.target is aten.mul.Tensor)
        inverse = next(u for u in scale.users if u.target is aten.reciprocal.default)
        weights = tuple(u for u in inverse.users if any(is_kind(c, OpKind.LINEAR) and c.args[1] is u for c in u.users))
        comps = tuple(u for u in inverse.users if u not in weights)
        sites.append(ScaleSite(str(node.target), node, scale, input_mul, inverse, weights, comps))
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
