"""GPTQ: round each Linear weight onto its quantization grid so that the Linear's *output*
error on calibration inputs is smallest, rather than rounding every weight to its nearest grid
point (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", OBQ-style error feedback with a Cholesky-factored inverse Hessian).

For a Linear ``y = x W^T`` with calibration inputs X, the layer's squared output error is
``tr((W - Q) H (W - Q)^T)`` with ``H = X^T X``. GPTQ quantizes one input column at a time (in
order of decreasing ``H_jj``, "act order", by default) and spreads that column's rounding
error over the columns not yet quantized, weighted by ``H^-1``. The grid is the one :class:`ConvertToFakeQuant`
would use: per-row scales (and, on an asymmetric spec, zero points) from the policy's weight
spec (min-max, or MSE-clipped with each input column's error weighted by its Gram diagonal,
what it costs at the output), computed from the float weight before any rounding. Only the
choice of grid point changes.

X is what the Linear reads in the fake-quant model: activations quantized with their calibrated
ranges, padding tokens (``attention_mask == 0``) left out. With ``sequential=True`` (as in the
GPTQ paper) the Linears are rounded in graph order and each one's X comes from the model whose
earlier Linears already carry their rounded weights, so a Linear's rounding also absorbs the
error its inputs picked up upstream; the graph runs once, node by node over all calibration
batches in lockstep (:class:`~outlierfx.graph.lockstep.Lockstep`). ``sequential=False`` (the default) takes every X from
the model with float weights (one plain forward per batch). The pass writes weights that already
lie on their grids, each row keeping the codes at its range's ends (+-qmax on a symmetric grid;
qmin and qmax on an asymmetric one) so that the conversion (and lowering, which reads scales
back by min-max) finds the same grid and changes nothing. Biases, embedding tables and tied
weights (an LM head sharing the embedding table) are left alone. Run it after calibration and
after any pass that rewrites weights (e.g.
:class:`~outlierfx.passes.fold_quadapter.FoldQuadapter`), before conversion. On a graph captured
without weights (``low_memory=True``) the Gram matrices come from a forward in block order and
the rounded weights are held as int8 codes, one block at a time
(:mod:`~outlierfx.passes.gptq_block_order`), in either mode.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

import torch
import torch.fx

from .. import distributed
from ..distributed import Reduction
from ..graph import meta
from ..graph.attrs import fetch_attr, is_shared_attr, replace_input_tensor
from ..graph.copy import copy_graph_module
from ..graph.lockstep import Lockstep
from ..graph.ops import has_stored_weight
from ..graph.weight_source import hold
from ..quantizers.gptq_rounding import gptq_round, layer_error, nearest_codes, row_grid
from ..quantizers.integer_codes import HeldCodes
from ..quantizers.observers import observation_paused
from ..quantizers.spec import Granularity, QuantSpec
from . import first_row_correction
from .base import GraphPass, require_calibrated_observers
from .convert_fake_quant import ConvertToFakeQuant, linear_weight_spec
from .training import Batch


RoundOne = Callable[[torch.fx.Node, torch.Tensor, int], torch.Tensor | None]  # (Linear, Gram, tokens) -> rounded
StepHook = Callable[[torch.fx.Node, Sequence[Lockstep]], None]  # called around each node of a lockstep run


@dataclasses.dataclass(frozen=True)
class RoundedLinear:
    node: str
    module_path: str
    columns: int
    tokens: int  # calibration rows in H
    nearest_error: float  # tr((W - Q) H (W - Q)^T) / tokens with round-to-nearest Q
    gptq_error: float  # the same with GPTQ's Q
    pinned_rows: int  # rows whose range-end code had to be restored (keeps the grid readable by min-max)

    @property
    def reduction(self) -> float:
        return 1.0 - self.gptq_error / self.nearest_error if self.nearest_error > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class GPTQPlan:
    linears: tuple[RoundedLinear, ...]
    weights: Mapping[str, torch.Tensor]  # Linear node -> rounded weight
    skipped: tuple[tuple[str, str], ...]  # (Linear node, why)
    spec: QuantSpec
    seconds: float
    act_order: bool  # columns rounded in order of decreasing H_jj (else in the weight's own order)
    refit_scales: bool  # each row's step refit to its codes by least squares after rounding
    # Linear node -> its rounded weight as int8 codes, on a graph captured without weights (the
    # weight source holds them: :mod:`~outlierfx.passes.gptq_block_order`); ``weights`` is empty there
    held: Mapping[str, HeldCodes] = dataclasses.field(default_factory=dict)
    # Linear node -> the vector added to its output at each text's first token (``first_rows``)
    first_rows: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    first_rows_skipped: str = ""  # why ``first_rows`` was asked for and none was measured

    def summary(self) -> str:
        if not self.linears:
            return f"GPTQ: no Linear rounded; skipped {list(self.skipped)}"
        near = sum(r.nearest_error for r in self.linears)
        ours = sum(r.gptq_error for r in self.linears)
        worst = min(self.linears, key=lambda r: r.reduction)
        order = ("act order" if self.act_order else "natural column order") + (
            ", row steps refit" if self.refit_scales else "")
        line = (f"GPTQ ({self.spec.describe()}, {order}): {len(self.linears)} Linears rounded in "
                f"{self.seconds:.1f}s; summed layer output error {near:.4g} -> {ours:.4g} "
                f"({1 - ours / max(near, 1e-30):.0%} lower than round-to-nearest; least gain "
                f"{worst.reduction:.0%} at {worst.module_path or worst.node})")
        if self.first_rows:
            line += f"; first-token rows of {len(self.first_rows)} Linears corrected"
        if self.first_rows_skipped:
            line += f"; no first-token row corrections: {self.first_rows_skipped}"
        if self.skipped:
            line += f"; skipped {len(self.skipped)}: {list(self.skipped)[:4]}"
        return line


class GramRecorder(torch.nn.Module):
    """Identity that accumulates ``X^T X`` over the real tokens of its input. Data-parallel
    ranks add their sums and token counts (:func:`outlierfx.distributed.reduce_statistics`)."""

    STATISTICS: ClassVar[Mapping[str, Reduction]] = {"gram": Reduction.SUM, "tokens": Reduction.SUM}

    def __init__(self) -> None:
        super().__init__()
        self.gram: torch.Tensor | None = None
        self.tokens = torch.zeros((), dtype=torch.long)
        self.mask: torch.Tensor | None = None

    def result(self) -> tuple[torch.Tensor, int]:
        """The Gram matrix (a 1 x 1 zero where no token came) and the number of tokens in it."""
        return (self.gram if self.gram is not None else torch.zeros(1, 1)), int(self.tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.detach().reshape(-1, x.shape[-1])
        if self.mask is not None and self.mask.numel() == rows.shape[0]:
            rows = rows[self.mask.reshape(-1)]
        rows = rows.float()
        gram = (rows.T @ rows).double()  # one batch's sum in fp32 (4x faster), the running total in fp64
        self.gram = gram if self.gram is None else self.gram + gram
        self.tokens += rows.shape[0]
        return x


class GPTQ(GraphPass[GPTQPlan]):
    """Round every untied, stored Linear weight with GPTQ (see the module docstring).

    Args:
        batches: calibration batches (keyword-input dicts).
        weight_spec, embedding_spec: the specs :class:`ConvertToFakeQuant` will use.
        damp: Hessian damping, a fraction of its mean diagonal (GPTQ's 1% default).
        sequential: each Linear's inputs from the model with the earlier Linears rounded
            (the module docstring says why); False: from the model with float weights.
        act_order: round each weight's columns in order of decreasing Hessian diagonal (GPTQ's
            act order, :func:`gptq_round`); False: in the weight's own column order.
        refit_scales: after rounding, give each row the step that fits its codes best at the
            layer's output (least squares, :func:`gptq_round`).
        first_rows: after rounding, add to each Linear's output at each text's first token the
            mean error of that row on the calibration texts, measured in graph order
            (:mod:`~outlierfx.passes.first_row_correction`: one float vector per Linear).
    """

    output_rel_tol = None  # the weights change on purpose

    def __init__(self, batches: Sequence[Batch], weight_spec: QuantSpec, embedding_spec: QuantSpec | None = None,
                 damp: float = 0.01, sequential: bool = False, act_order: bool = True,
                 refit_scales: bool = False, first_rows: bool = False) -> None:
        if not batches:
            raise ValueError("GPTQ needs calibration batches")
        if weight_spec.granularity is Granularity.PER_CHANNEL and weight_spec.axis not in (0, -2):
            raise ValueError("GPTQ rounds per output row: per-channel weight specs need axis 0, "
                             f"got {weight_spec.axis}")
        if weight_spec.granularity is Granularity.PER_GROUP:
            raise ValueError("GPTQ supports per-tensor and per-channel weight specs")
        if not damp > 0:
            raise ValueError(f"damp must be > 0, got {damp}")
        self.batches = [dict(b) for b in batches]
        self.weight_spec, self.embedding_spec, self.damp = weight_spec, embedding_spec, damp
        self.sequential, self.act_order, self.refit_scales = sequential, act_order, refit_scales
        self.first_rows = first_rows

    def requires(self, gm: torch.fx.GraphModule) -> None:
        require_calibrated_observers(gm, "GPTQ")

    def analyze(self, gm: torch.fx.GraphModule) -> GPTQPlan:
        start = time.perf_counter()
        targets, skipped = [], []
        for node in gm.graph.nodes:
            if not has_stored_weight(node):
                continue
            if is_shared_attr(gm, node.args[1]):
                skipped.append((node.name, "weight tied to another reader"))
            elif fetch_attr(gm, str(node.args[1].target)).dim() != 2:
                skipped.append((node.name, "weight is not a matrix"))
            else:
                targets.append(node)
        linears: list[RoundedLinear] = []
        weights: dict[str, torch.Tensor] = {}

        def round_one(node: torch.fx.Node, gram: torch.Tensor, tokens: int) -> torch.Tensor | None:
            if tokens == 0:
                skipped.append((node.name, "no calibration token reached it"))
                return None
            weight = fetch_attr(gm, str(node.args[1].target)).detach()
            spec = linear_weight_spec(node, self.weight_spec)  # the grid ConvertToFakeQuant gives it
            scale, zero_point = grid = row_grid(weight, spec, gram)  # one range search serves both roundings
            rounded, pinned = gptq_round(weight, gram, spec, self.damp, grid=grid, act_order=self.act_order,
                                         refit_scales=self.refit_scales)
            step, zero = scale.unsqueeze(1).double(), zero_point.unsqueeze(1).double()
            nearest = ((nearest_codes(weight, step, zero, spec) - zero) * step).to(weight.dtype)  # GPTQ's grid
            linears.append(RoundedLinear(node.name, meta.module_path(node), weight.shape[1], tokens,
                                         layer_error(weight, nearest, gram) / tokens,
                                         layer_error(weight, rounded, gram) / tokens, pinned))
            return rounded

        def round_and_keep(node: torch.fx.Node, gram: torch.Tensor, tokens: int) -> torch.Tensor | None:
            rounded = round_one(node, gram, tokens)
            if rounded is not None:
                weights[node.name] = rounded
            return rounded

        held: dict[str, HeldCodes] = {}
        first_rows: dict[str, torch.Tensor] = {}
        first_rows_skipped = self._first_rows_blocker(gm)
        measure = self.first_rows and not first_rows_skipped
        if gm.meta.get(meta.GM_WEIGHT_SOURCE) is not None:  # captured without weights: a block at a time
            from .gptq_block_order import correct_first_rows_in_block_order, round_in_block_order

            held = round_in_block_order(gm, targets, self._work_graph(gm), self.batches, self.weight_spec, round_one,
                                        self.sequential)
            if measure:  # one more forward in block order, the rounded weights in place
                first_rows = correct_first_rows_in_block_order(gm, targets, self._work_graph(gm), self.batches, held)
        else:
            if self.sequential:
                work = self._work_graph(gm)
                self._in_lockstep(work, rounding_in_lockstep(work, targets, round_and_keep))
            else:
                grams = self._gram_matrices(gm, targets)
                for node in targets:
                    round_and_keep(node, *grams[node.name])
            if measure:  # one more pass, node by node, with the rounded weights in place
                work = self._work_graph(gm)
                after, first_rows = first_row_correction.measure_in_lockstep(work, gm, targets, weights.__contains__)
                self._in_lockstep(work, with_weights(weights.get), after)
        return GPTQPlan(tuple(linears), weights, tuple(skipped), self.weight_spec, time.perf_counter() - start,
                        self.act_order, self.refit_scales, held, first_rows, first_rows_skipped)

    def _first_rows_blocker(self, gm: torch.fx.GraphModule) -> str:
        """Why first-row corrections cannot be measured on ``gm`` ("" where they can, or were not asked for)."""
        if not self.first_rows:
            return ""
        if not any(n.op == "placeholder" and n.target == first_row_correction.ATTENTION_MASK for n in gm.graph.nodes):
            return "the graph has no attention_mask input to tell each text's first token"
        return ""

    def _work_graph(self, gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        """The fake-quant model with float weights (activations on their calibrated grids)."""
        return ConvertToFakeQuant(None, self.embedding_spec)(copy_graph_module(gm)).graph_module

    def _in_lockstep(self, work: torch.fx.GraphModule, before: StepHook, after: StepHook | None = None) -> None:
        """Run ``work`` over every batch node by node, calling ``before`` and ``after`` around
        each node (sequential rounding: :func:`rounding_in_lockstep`; first-row corrections:
        :func:`~outlierfx.passes.first_row_correction.measure_in_lockstep`)."""
        runs = [Lockstep(work, batch) for batch in distributed.shard(self.batches)]
        with torch.no_grad(), observation_paused():
            for node in work.graph.nodes:
                before(node, runs)
                for run in runs:
                    run.step(node)
                if after is not None:
                    after(node, runs)

    def _gram_matrices(self, gm: torch.fx.GraphModule, targets: list[torch.fx.Node]
                       ) -> dict[str, tuple[torch.Tensor, int]]:
        """``X^T X`` of each target Linear's input in the fake-quant model (float weights)."""
        work = self._work_graph(gm)
        recorders = {name: recorder for name, (_, recorder) in record_grams(work, targets).items()}
        with torch.no_grad(), observation_paused(), distributed.failing_together("collecting GPTQ's Gram matrices"):
            for batch in distributed.shard(self.batches):
                mask = batch.get("attention_mask")
                for r in recorders.values():
                    r.mask = None if mask is None else mask.bool()
                work(**batch)
        distributed.reduce_statistics(recorders.values())
        return {name: r.result() for name, r in recorders.items()}

    def apply(self, gm: torch.fx.GraphModule, plan: GPTQPlan) -> bool:
        by_name = {n.name: n for n in gm.graph.nodes}
        for name, weight in plan.weights.items():
            node = by_name[name]
            replace_input_tensor(gm, node, node.args[1], weight, "_gptq")
        if plan.held:  # untied weights: each keeps its target, which now loads from its codes
            hold(gm, {str(by_name[name].args[1].target): codes for name, codes in plan.held.items()})
        first_row_correction.insert_corrections(gm, plan.first_rows)
        return bool(plan.weights or plan.held)


def with_weights(weight_of: Callable[[str], torch.Tensor | None]) -> StepHook:
    """A lockstep hook that gives each Linear the weight ``weight_of(its name)`` (None: its own)
    just before it runs."""

    def before(node: torch.fx.Node, runs: Sequence[Lockstep]) -> None:
        weight = weight_of(node.name) if node.op == "call_function" else None
        if weight is not None:
            for run in runs:
                run.env[node.args[1]] = weight

    return before


def rounding_in_lockstep(work: torch.fx.GraphModule, targets: Sequence[torch.fx.Node], round_one: RoundOne
                         ) -> StepHook:
    """Sequential GPTQ's step, called before each node of ``work`` (the work graph of
    ``targets``' graph) runs on every batch's :class:`Lockstep` run: at a target Linear, round its
    weight on the Gram matrix of its input as it arrives (earlier Linears already rounded) and
    give the runs the rounded weight. Siblings reading one input share its Gram."""
    original = {n.name: n for n in targets}
    pending: dict[torch.fx.Node, int] = {}  # input -> target Linears still to read its Gram
    for node in work.graph.nodes:
        if node.name in original:
            pending[node.args[0]] = pending.get(node.args[0], 0) + 1
    grams: dict[torch.fx.Node, tuple[torch.Tensor, int]] = {}

    def before(node: torch.fx.Node, runs: Sequence[Lockstep]) -> None:
        if node.name not in original:
            return
        source = node.args[0]
        if source not in grams:
            recorder = GramRecorder()
            for run in runs:
                recorder.mask = run.mask
                recorder(run.env[source])
            distributed.reduce_statistics([recorder])
            grams[source] = recorder.result()
        rounded = round_one(original[node.name], *grams[source])
        pending[source] -= 1
        if not pending[source]:
            del grams[source]
        if rounded is not None:
            for run in runs:
                run.env[node.args[1]] = rounded

    return before


def record_grams(work: torch.fx.GraphModule, targets: Sequence[torch.fx.Node]
                 ) -> dict[str, tuple[torch.fx.Node, GramRecorder]]:
    """Insert a :class:`GramRecorder` before each of ``targets``' Linears in ``work`` (a copy
    of their graph, which has nodes of the same names): Linear node name -> (recorder node,
    recorder)."""
    by_name = {n.name: n for n in work.graph.nodes}
    recorders = {}
    for node in targets:
        linear = by_name[node.name]
        name = f"outlierfx_gptq_recorder_{node.name}"
        recorder = GramRecorder()
        work.add_module(name, recorder)
        with work.graph.inserting_before(linear):
            recorded = work.graph.call_module(name, (linear.args[0],))
        linear.update_arg(0, recorded)
        recorders[node.name] = (recorded, recorder)
    work.recompile()
    return recorders
