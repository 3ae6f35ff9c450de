"""ClipTokenwise: Outlier Suppression's token-wise clipping, coarse stage (Wei et al. 2022).

Every per-tensor activation observer has recorded each token's max and min. A clipping ratio
alpha sets the quantizer range to the alpha-quantile of the per-token maxima (and the
(1-alpha)-quantile of the minima): the few tokens with huge values are clipped, the many
ordinary ones keep a fine grid. Alpha is chosen to minimise the MSE of the *final* model output
against the unquantized graph on calibration batches.

Beyond the reference (one alpha shared by all quantizers): after the global search, alpha is
refined greedily block by block. Each candidate for block b reuses the cached values at block
b's input, so only blocks b.. are recomputed. A range is never widened beyond min-max.

On a graph captured without weights (``low_memory=True``) the candidates of one search step
(the global grid; one block's alternatives) are evaluated together, segment by segment from
the block's input (:func:`~outlierfx.graph.block_order.segments_of`): each segment's weights are
loaded once and every candidate's batches run through it, so a step loads each later block once
instead of once per candidate, and each candidate's loss is computed at the output and only the
number kept. Each (candidate, batch) runs the same ops on the same values as the loaded search,
and the losses add up in the same order: the same choices bit for bit.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.fx

from ..errors import PassError
from ..graph import meta
from ..graph.attrs import fetch_attr
from ..graph.block_order import run_in_block_order, segments_of
from ..graph.compare import float_leaves
from ..graph.copy import copy_graph_module
from ..graph.probe import flatten_inputs, probe, values_read_after
from ..graph.view import GraphView
from ..graph.weight_source import materialized
from ..quantizers.observers import FakeQuantize, Observer, quantizers_disabled
from ..quantizers.spec import Estimator, Granularity
from .base import GraphPass
from .convert_fake_quant import wire_sink_quantizers

SPAN_BY_BITS = {8: 0.1, 7: 0.2, 6: 0.3, 5: 0.6, 4: 0.9}


@dataclasses.dataclass(frozen=True)
class ClipPlan:
    alphas: Mapping[str, float]  # observer module -> chosen alpha (1.0: min-max)
    candidates: tuple[float, ...]
    global_alpha: float
    loss_unclipped: float
    loss_global: float
    loss_final: float
    search_seconds: float
    evaluations: int

    def summary(self) -> str:
        clipped = sum(a < 1.0 for a in self.alphas.values())
        return (f"token-wise clipping: global alpha {self.global_alpha:.2f}, then per block; {clipped}/"
                f"{len(self.alphas)} quantizers clipped; output MSE {self.loss_unclipped:.4g} -> {self.loss_global:.4g} "
                f"(global) -> {self.loss_final:.4g} (per block); {self.evaluations} evaluations in "
                f"{self.search_seconds:.1f}s")


class ClipTokenwise(GraphPass[ClipPlan]):
    output_rel_tol = 0.0  # observers keep returning their input; only their ranges change
    trains_or_searches = True  # a range search, each step running the candidates

    def __init__(self, batches: Sequence[Mapping[str, torch.Tensor]], candidates: Sequence[float] | None = None,
                 per_block: bool = True, max_batches: int = 4, steps: int = 10, progress: bool = False) -> None:
        """``progress`` shows a bar over the candidate evaluations (on SmolLM2 the per-block search
        runs about 1,500 of them: 25 min on 2 cores under ``linear-inputs``, over an hour under ``full``)."""
        if not batches:
            raise ValueError("token-wise clipping needs calibration batches to search on")
        self.batches = [dict(b) for b in list(batches)[:max_batches]]
        self.candidates = tuple(candidates) if candidates is not None else None
        self.per_block = per_block
        self.steps = steps
        self.progress = progress

    def _grid(self, bits: int) -> tuple[float, ...]:
        if self.candidates is not None:
            return tuple(sorted(set(self.candidates) | {1.0}, reverse=True))
        span = SPAN_BY_BITS.get(bits, 0.1 if bits > 8 else 0.9)
        return tuple(round(1.0 - span * i / self.steps, 4) for i in range(self.steps + 1))

    def analyze(self, gm: torch.fx.GraphModule) -> ClipPlan:
        start = time.perf_counter()
        names = [n for n, m in gm.named_children() if isinstance(m, Observer)
                 and m.spec.granularity is Granularity.PER_TENSOR]
        if not names:
            raise PassError("no per-tensor activation observers to clip; run InsertObservers first")
        observers = {n: getattr(gm, n) for n in names}
        if not all(o.calibrated and o.token_max.numel() for o in observers.values()):
            raise PassError("token-wise clipping needs calibrated observers; run calibrate() first")
        bits = max(o.spec.bits for o in observers.values())
        grid = self._grid(bits)
        search = _Search(gm, self.batches, observers, grid)
        blocks = search.blocks(names) if self.per_block else []
        from tqdm.auto import tqdm

        # unclipped, the global grid, then every other candidate per block
        bar = tqdm(total=1 + len(grid) + len(blocks) * (len(grid) - 1), desc="token-wise clipping", unit="eval",
                   disable=not self.progress)
        search.on_evaluation = bar.update
        # unclipped, then coarse: one alpha for all quantizers
        loss_unclipped, *losses = search.losses([{}] + [{n: a for n in names} for a in grid], {}, 0)
        global_losses = dict(zip(grid, losses))
        global_alpha = min(global_losses, key=global_losses.get)
        choice = {n: global_alpha for n in names}
        loss = global_losses[global_alpha]
        loss_global = loss
        bar.set_postfix(alpha=global_alpha, mse=f"{loss:.4g}")
        for block_names, boundary in blocks:
            best_alpha, best_loss = choice[block_names[0]], loss
            others = [a for a in grid if a != best_alpha]
            trials = search.losses([dict(choice, **{n: a for n in block_names}) for a in others], choice, boundary)
            for a, trial_loss in zip(others, trials):
                if trial_loss < best_loss:
                    best_alpha, best_loss = a, trial_loss
            choice.update({n: best_alpha for n in block_names})
            loss = best_loss
            bar.set_postfix(mse=f"{loss:.4g}")
        bar.close()
        return ClipPlan(choice, grid, global_alpha, loss_unclipped, loss_global, loss,
                        time.perf_counter() - start, search.evaluations)

    def apply(self, gm: torch.fx.GraphModule, plan: ClipPlan) -> bool:
        for name, alpha in plan.alphas.items():
            old: Observer = getattr(gm, name)
            setattr(gm, name, old.with_spec(old.spec.with_(estimator=Estimator.TOKEN_QUANTILE, token_alpha=alpha)))
        return any(a < 1.0 for a in plan.alphas.values())


class _Search:
    """Evaluates clipping choices on a fake-quant copy of the observed graph."""

    def __init__(self, gm: torch.fx.GraphModule, batches: list[dict], observers: Mapping[str, Observer],
                 grid: tuple[float, ...]) -> None:
        self.work = copy_graph_module(gm)
        for name, module in gm.named_children():
            if isinstance(module, Observer):
                setattr(self.work, name, FakeQuantize.from_observer(module))
        wire_sink_quantizers(self.work, "ClipTokenwise")
        self.params = {
            name: {a: obs.with_spec(obs.spec.with_(estimator=Estimator.TOKEN_QUANTILE, token_alpha=a)).qparams()
                   for a in grid}
            for name, obs in observers.items()
        }
        self.batches = batches
        self.inputs = [flatten_inputs(self.work, (), b) for b in batches]
        self.order = {n: i for i, n in enumerate(self.work.graph.nodes)}
        self.evaluations = 0
        self.on_evaluation: Callable[[], object] = lambda: None
        source = self.work.meta.get(meta.GM_WEIGHT_SOURCE)
        self.stored = {n for n in self.work.graph.nodes if n.op == "get_attr" and source is not None
                       and n.target in source.tensors}  # loaded segment by segment: captured without weights
        with torch.no_grad(), quantizers_disabled(self.work):
            self.reference = [float_leaves(out) for out in run_in_block_order(self.work, batches).outputs] \
                if source is not None else [float_leaves(torch.fx.Interpreter(self.work).run(*x)) for x in self.inputs]

    def losses(self, choices: Sequence[Mapping[str, float]], base: Mapping[str, float], boundary: int) -> list[float]:
        """The loss of each of ``choices``, which differ from ``base`` only at nodes from graph
        position ``boundary`` on (the start of a block, or 0)."""
        if self.stored:
            return self._losses_segment_by_segment(choices, base, boundary)
        cache = self.cached_env(base, boundary)
        return [self.loss(choice, cache) for choice in choices]

    def _losses_segment_by_segment(self, choices: Sequence[Mapping[str, float]], base: Mapping[str, float],
                                   boundary: int) -> list[float]:
        """:meth:`losses` on a graph captured without weights (see the module docstring)."""
        output = self.work.graph.output_node()
        placeholders = [n for n in self.work.graph.nodes if n.op == "placeholder"]
        nodes = [n for n in self.work.graph.nodes if n.op not in ("placeholder", "output") and n not in self.stored]
        envs = {(None, i): dict(zip(placeholders, x)) for i, x in enumerate(self.inputs)}  # base's, before boundary
        totals = [[0.0] * len(self.inputs) for _ in choices]
        with torch.no_grad():
            for segment in segments_of(self.work, nodes):  # segments start at block boundaries
                if self.order[segment[0]] >= boundary and (None, 0) in envs:  # each choice goes on from base's values
                    envs = {(c, i): dict(env) for c in range(len(choices)) for (_, i), env in envs.items()}
                attrs = list(dict.fromkeys(a for n in segment for a in n.all_input_nodes if a in self.stored))
                with materialized(self.work, [str(a.target) for a in attrs]):
                    weights = {a: fetch_attr(self.work, str(a.target)) for a in attrs}
                    for (c, i), env in envs.items():
                        self._set(base if c is None else choices[c])
                        runner = torch.fx.Interpreter(self.work)
                        runner.env = env
                        env.update(weights)
                        for node in segment:
                            env[node] = runner.run_node(node)
                        if segment[-1] is nodes[-1]:
                            out = float_leaves(self.work.graph.process_outputs(runner.run_node(output)))
                            totals[c][i] = sum(float((o - r).pow(2).mean()) for o, r in zip(out, self.reference[i]))
                live = set(values_read_after(self.work, self.order[segment[-1]] + 1)) - self.stored
                for env in envs.values():
                    for value in [v for v in env if v not in live]:
                        del env[value]
        losses = []
        for per_batch in totals:
            self.evaluations += 1
            self.on_evaluation()
            total = 0.0
            for value in per_batch:  # batch after batch, as loss() adds them
                total += value
            losses.append(total / len(self.inputs))
        return losses

    def _set(self, choice: Mapping[str, float]) -> None:
        for name, options in self.params.items():
            fq: FakeQuantize = getattr(self.work, name)
            scale, zero_point = options[choice.get(name, 1.0)]
            fq.scale, fq.zero_point = scale.float(), zero_point

    def loss(self, choice: Mapping[str, float] | None = None, cache: list[dict] | None = None) -> float:
        self._set(choice or {})
        self.evaluations += 1
        self.on_evaluation()
        total = 0.0
        with torch.no_grad():
            for i, x in enumerate(self.inputs):
                env = dict(cache[i]) if cache is not None else None
                out = float_leaves(torch.fx.Interpreter(self.work).run(*x, initial_env=env))
                total += sum(float((o - r).pow(2).mean()) for o, r in zip(out, self.reference[i]))
        return total / len(self.inputs)

    def blocks(self, names: Sequence[str]) -> list[tuple[list[str], int]]:
        """Quantizers grouped by transformer block, with the graph position where each block starts."""
        ends = [self.order[b.sublayers[-1].add] for b in GraphView(self.work).blocks]
        if not ends:
            return []
        node_of = {n.target: n for n in self.work.graph.nodes if n.op == "call_module"}
        groups: list[list[str]] = [[] for _ in ends]
        for name in names:
            position = self.order[node_of[name]]
            index = next((i for i, end in enumerate(ends) if position <= end), len(ends) - 1)
            groups[index].append(name)
        starts = [0] + [end + 1 for end in ends[:-1]]
        return [(g, s) for g, s in zip(groups, starts) if g]

    def cached_env(self, choice: Mapping[str, float], boundary: int) -> list[dict] | None:
        """Values of nodes before ``boundary`` that later nodes read, under ``choice``."""
        if boundary == 0:
            return None
        self._set(choice)
        before = [n for n in self.work.graph.nodes if self.order[n] < boundary]
        needed = {n for n in before if n.op == "placeholder" or any(self.order[u] >= boundary for u in n.users)}
        caches = []
        for batch in self.batches:
            captured: dict = {}
            probe(self.work, needed, ((), batch), captured.__setitem__)
            # Every node before the boundary is pre-filled (None where nothing downstream reads
            # it), so the interpreter starts computing at the boundary.
            caches.append({n: captured.get(n) for n in before})
        return caches
