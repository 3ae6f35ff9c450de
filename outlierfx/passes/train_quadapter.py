"""TrainQuadapter: learn the inserted Quadapter scales (see :mod:`.quadapter`), block by block.

The loss is the MSE between the FP32 block output and the fake-quantized block output on
calibration batches (padding excluded); the quantized block reads the output of the
already-trained quantized blocks before it. Model weights stay frozen (checked), activation
quantizer ranges are re-estimated once after initialisation (identity, or SmoothQuant-style
``s = max|W|^(1-a) / max|x|^a``) and then fixed. Phase 2 (``end_to_end_steps``) then trains the
same scales end to end on the task loss.

The training graph is :func:`unfolded_fake_quant`: the converted fake-quant model with the
scales still unfolded and straight-through quantizers
(:mod:`outlierfx.quantizers.trainable`), so it computes what the folded model will.

On a graph captured without weights (``quantize(..., low_memory=True)``) the block-by-block
training runs as it is, with each segment's weights loaded (from the checkpoint, or the held
int8 codes of the work graph's quantized weights) only while that segment trains and advances
(:meth:`_Stepper.loading`), and the statistics before it (the SmoothQuant init's maxima, the
site quantizers' ranges) are collected in block order (:func:`~outlierfx.graph.block_order.probe_batches`):
the same values in the same order, so the same scales bit for bit. Phase 2 trains on the
whole model's loss at every step and is refused there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.fx

from .. import distributed
from ..errors import PassError
from ..graph import meta
from ..graph.attrs import del_attr, fetch_attr, set_attr, unique_attr_name
from ..graph.compare import masked_mse
from ..graph.block_order import probe_batches
from ..graph.copy import copy_graph_module
from ..graph.probe import flatten_inputs, run_nodes, values_read_after
from ..graph.view import GraphView
from ..graph.weight_source import materialized, value_of
from ..quantizers.observers import FakeQuantize, Observer, merge_across_ranks, observation_paused, token_mask
from ..quantizers.spec import QuantSpec, weight_spec
from ..quantizers.trainable import TrainableActivationQuantizer, TrainableWeightQuantizer
from .base import GraphPass
from .convert_fake_quant import ConvertToFakeQuant
from .quadapter import NAME, QUANTIZERS, SCALE_PREFIX, ScaleSite, inserted_sites, scale_parameters
from .training import Schedule, fit, mean_loss, my_batches, step, task_loss


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
    if meta.GM_WEIGHT_SOURCE in converted.meta:  # captured without weights: the copy drops the stale weights' codes
        return copy_graph_module(converted)
    return converted


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


def _fingerprint(gm: torch.fx.GraphModule) -> dict[str, object]:
    """Version counter and checksums of every model tensor (scales and quantizer state excluded;
    a graph captured without weights holds meta stand-ins, whose version counters are checked,
    and the weight source they load from)."""
    skip = {name for name, m in gm.named_modules() if isinstance(m, QUANTIZERS)}
    out: dict[str, object] = {"weight source": id(gm.meta.get(meta.GM_WEIGHT_SOURCE))}
    for name, t in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name.startswith(SCALE_PREFIX) or name.rsplit(".", 1)[0] in skip:
            continue
        d = t.detach().double()
        out[name] = (t._version, 0.0, 0.0) if t.is_meta else (t._version, float(d.sum()), float(d.abs().sum()))
    return out


class _Stepper:
    """Runs a graph block by block on several batches, keeping only the values later nodes read.

    On a graph captured without weights, a segment runs inside :meth:`loading`, which loads the
    weights its nodes read; the caches never hold a weight (a later segment loads its own)."""

    def __init__(self, gm: torch.fx.GraphModule, inputs: Sequence[list]) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.position = {n.name: i for i, n in enumerate(self.nodes)}
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.caches = [dict(zip(placeholders, x)) for x in inputs]
        self.start = 0
        source = gm.meta.get(meta.GM_WEIGHT_SOURCE)
        self.loads = {n for n in self.nodes if n.op == "get_attr" and source is not None and n.target in source.tensors}
        self.weights: dict[torch.fx.Node, torch.Tensor] = {}  # the loaded weights of the segment that runs

    def segment(self, end: str) -> tuple[int, torch.fx.Node]:
        return self.start, self.nodes[self.position[end]]

    @contextlib.contextmanager
    def loading(self, end: str) -> Iterator[None]:
        """The weights the nodes from the current start through ``end`` read, loaded for the
        ``with`` block (nothing to do on a graph holding its weights)."""
        read = [a for n in self.nodes[self.start:self.position[end] + 1] for a in n.all_input_nodes if a in self.loads]
        with materialized(self.gm, [str(a.target) for a in read]) if read else contextlib.nullcontext():
            self.weights = {a: fetch_attr(self.gm, str(a.target)) for a in read}
            try:
                yield
            finally:
                self.weights = {}

    def run(self, batch: int, stop: torch.fx.Node) -> dict[torch.fx.Node, object]:
        """Batch ``batch`` (its position in the caches) from the cache through ``stop``."""
        return run_nodes(self.gm, {**self.caches[batch], **self.weights}, self.start, stop)

    def advance(self, end: str) -> list[object]:
        """Values of node ``end`` per batch (no autograd); the caches move past it."""
        _, stop = self.segment(end)
        boundary = self.position[end] + 1
        live = [n for n in values_read_after(self.gm, boundary) if n not in self.loads]
        outs = []
        with torch.no_grad(), observation_paused():  # observers shared with the input graph record nothing
            for i in range(len(self.caches)):
                env = self.run(i, stop)
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
    trains_or_searches = True  # Adam steps on every block

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
        if self.end_to_end_steps > 0 and gm.meta.get(meta.GM_WEIGHT_SOURCE) is not None:
            raise PassError("Quadapter's phase 2 (end_to_end_steps) trains on the whole model's loss at every step, "
                            "which a graph captured without weights (low_memory=True) cannot run; train block by "
                            "block only (end_to_end_steps=0) or quantize the loaded model")

    def analyze(self, gm: torch.fx.GraphModule) -> TrainQuadapterPlan:
        start_time = time.perf_counter()
        fingerprint = _fingerprint(gm)
        work = copy_graph_module(gm)  # own scale parameters and site observers; tensors shared otherwise
        sites = inserted_sites(work)
        for site in sites:
            set_attr(work, site.target, torch.nn.Parameter(fetch_attr(gm, site.target).detach().clone()))
        mine = my_batches(len(self.batches))  # data-parallel: this rank's batches (all in one process)
        inputs = [flatten_inputs(work, (), self.batches[i]) for i in mine]
        masks = [self.batches[i].get("attention_mask") for i in mine]
        if self.init == "smoothquant":
            self._smoothquant_init(work, sites)
        observers = self._refresh_observers(work, sites, mine)

        quantized = unfolded_fake_quant(work, self.weight)
        scales = scale_parameters(quantized)  # the same Parameter objects as work's
        for name, p in list(quantized.named_parameters()):
            if name not in scales:  # frozen weights: detached copies, so no gradient reaches them
                del_attr(quantized, name)
                set_attr(quantized, name, p.detach())

        reference = _Stepper(work, inputs)  # block inputs and targets of this rank's batches only
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
            with reference.loading(end):
                targets = reference.advance(end)
            with student.loading(end):
                if index not in by_segment:
                    student.advance(end)
                    continue
                block_fit = self._train_block(index, by_segment[index], scales, student, end, targets, masks, mine)
            fits.append(block_fit)
            if bar is not None:
                bar.set_postfix(loss=f"{block_fit.loss_before:.3g}->{block_fit.loss_after:.3g}", steps=block_fit.steps)
        phase2, kind = [], ""
        if self.end_to_end_steps > 0:
            kind, loss = task_loss(work, self.batches, mine=mine)
            phase2 = fit(list(scales.values()), lambda i: loss(quantized(**self.batches[i]), i), len(self.batches),
                         self.end_to_end_steps, self.end_to_end_lr, "Quadapter phase 2", self.progress)
        unchanged = _fingerprint(gm) == fingerprint and all(
            p.grad is None for name, p in gm.named_parameters() if not name.startswith(SCALE_PREFIX))
        if not unchanged:
            raise PassError("Quadapter training changed a model weight; only the scales may change")
        # every rank took the same averaged steps and decisions; rank 0's scales and site ranges
        # everywhere still guarantee that ranks on different CPUs cannot drift apart
        distributed.broadcast_from_main([*scales.values(), *(b for o in observers.values() for b in o.buffers())])
        return TrainQuadapterPlan(self.init, self.alpha, {t: p.detach().clone() for t, p in scales.items()}, observers,
                                  tuple(fits), sum(p.numel() for p in scales.values()), unchanged,
                                  time.perf_counter() - start_time, tuple(phase2), kind)

    def _train_block(self, index: int, targets_of: list[str], scales: Mapping[str, torch.nn.Parameter],
                     student: _Stepper, end: str, targets: list[object], masks: list,
                     mine: tuple[int, ...]) -> BlockFit:
        """Train one block's scales; ``student``, ``targets`` and ``masks`` hold this rank's
        batches ``mine`` (global indices), and every loss that decides is over all ranks'."""
        params = [scales[t] for t in targets_of]
        _, stop = student.segment(end)
        local = {batch: k for k, batch in enumerate(mine)}
        total = len(self.batches)

        def loss_of(i: int) -> torch.Tensor:
            env = student.run(local[i], stop)
            return masked_mse(env[stop], targets[local[i]], masks[local[i]])

        before = mean_loss(loss_of, mine, total)
        optimizer = torch.optim.Adam(params, lr=self.lr)
        initial = [p.detach().clone() for p in params]
        best, best_state, bad, steps, early = before, initial, 0, 0, False
        window = max(total, self.check_every)
        schedule = Schedule(self.max_steps, mine)
        running, count = 0.0, 0
        for t in range(schedule.optimizer_steps):
            running += step(params, optimizer, loss_of, schedule, t)
            count, steps = count + schedule.covered(t), schedule.done(t)
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
                    known = mean_loss(loss_of, mine, total)
                scored.append((known, len(scored), state))
            _, _, chosen = min(scored, key=lambda item: item[:2])
            for p, value in zip(params, chosen):
                p.copy_(value)
        outs = student.advance(end)
        after = mean_loss(lambda i: masked_mse(outs[local[i]], targets[local[i]], masks[local[i]]), mine, total)
        return BlockFit(index, tuple(targets_of), before, after, steps, early)

    def _smoothquant_init(self, work: torch.fx.GraphModule, sites: list[ScaleSite]) -> None:
        x_max: dict[str, torch.Tensor] = {}

        def record(node: torch.fx.Node, _: int, value: torch.Tensor) -> None:
            rows = value.detach().abs().reshape(-1, value.shape[-1]).amax(0)
            x_max[node.name] = torch.maximum(x_max[node.name], rows) if node.name in x_max else rows

        operands = {s.operand for s in sites}
        # every rank reads every batch here: one forward each, exact, under 1% of the pass
        with observation_paused():
            probe_batches(work, operands, self.batches, record)
        with torch.no_grad():
            for site in sites:  # value_of: one weight loaded at a time on a graph captured without weights
                w_max = torch.stack([value_of(work, str(m.args[0].target)).abs().amax(0)
                                     for m in site.weight_muls]).amax(0)
                log_s = (1 - self.alpha) * w_max.clamp_min(1e-5).log() - self.alpha * \
                    x_max[site.operand.name].clamp_min(1e-5).log()
                fetch_attr(work, site.target).copy_(log_s - log_s.mean())  # the mean only rescales the range

    def _refresh_observers(self, work: torch.fx.GraphModule, sites: list[ScaleSite],
                           mine: tuple[int, ...]) -> dict[str, Observer]:
        """Fresh statistics for each site quantizer, on x * s (observers elsewhere are untouched):
        this rank's batches ``mine``, merged across ranks."""
        fresh = {}
        for site in sites:
            name = str(site.quantizer.target)
            old = work.get_submodule(name)
            fresh[name] = Observer(old.spec, old.name, old.roles)
            setattr(work, name, fresh[name])
        by_node = {site.input_mul: fresh[str(site.quantizer.target)] for site in sites}
        with observation_paused():
            probe_batches(work, by_node, [self.batches[i] for i in mine],
                          lambda node, _, value: by_node[node].observe(value), token_mask)
        merge_across_ranks(list(fresh.values()))
        return fresh

    def apply(self, gm: torch.fx.GraphModule, plan: TrainQuadapterPlan) -> bool:
        for target, value in plan.log_scales.items():
            set_attr(gm, target, torch.nn.Parameter(value.clone()))
        for name, observer in plan.observers.items():
            setattr(gm, name, observer)
        return True
