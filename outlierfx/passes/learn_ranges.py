"""LearnRanges: the fine stage of Outlier Suppression's token-wise clipping, LSQ+ style.

After calibration (and, in ``os`` recipes, the coarse clipping search) every activation
quantizer's range [lo, hi] becomes a learnable pair, and Adam moves them to minimise the MSE of
the final model output against the unquantized model on the calibration batches (the true loss
is checked every ``check_every`` steps and the best ranges seen are kept; data-parallel under
torch.distributed, see :mod:`.training`). The model runs
with its weights quantized as ConvertToFakeQuant will quantize them, so the ranges learn to
absorb the weight error too. Rounding is straight-through; the scale and zero point follow from
[lo, hi] exactly as :func:`~outlierfx.quantizers.fake_quant.qparams_from_range` computes them,
so the gradient w.r.t. the range is LSQ+'s (Bhalgat et al. 2020) and the forward pass is
bit-identical to the converted model.

Grouped (PEG) quantizers learn one range per group; per-channel ones one per channel. Model
weights never change (they get no gradient). If training does not lower the calibration loss,
the pass keeps the ranges it started from and says so.

On a graph captured without weights (``low_memory=True``) the targets come from a forward in
block order and every training forward runs segment by segment under activation checkpointing,
each segment loading its weights (the converted ones from their int8 codes) when it runs and
again when the backward needs it (:func:`~outlierfx.graph.segment_checkpoint.differentiable_forward`):
the same autograd graph, so the same ranges bit for bit, with one block's weights in memory.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence

import torch
import torch.fx

from .. import distributed
from ..errors import PassError
from ..graph.compare import masked_mse
from ..graph import meta
from ..graph.block_order import run_in_block_order
from ..graph.copy import copy_graph_module
from ..graph.segment_checkpoint import differentiable_forward
from ..quantizers.observers import FakeQuantize, Observer, observation_paused
from ..quantizers.spec import QuantSpec
from ..quantizers.trainable import LearnableRange
from .base import GraphPass
from .convert_fake_quant import ConvertToFakeQuant
from .training import Schedule, mean_loss, my_batches, step


@dataclasses.dataclass(frozen=True)
class LearnRangesPlan:
    ranges: Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # observer -> learned (lo, hi), per channel if grouped
    parameters: int
    steps: int
    best_step: int  # the step whose ranges are kept (0: the starting ranges)
    loss_start: float  # output MSE vs the unquantized model, calibration batches
    loss_end: float  # with the kept ranges
    kept_start: bool  # training never lowered the loss: the starting ranges stay
    seconds: float

    def summary(self) -> str:
        verdict = "kept the starting ranges (no improvement)" if self.kept_start else "learned ranges applied"
        return (f"learned {self.parameters} range parameters of {len(self.ranges)} quantizers, {self.steps} "
                f"steps (kept step {self.best_step}): output MSE {self.loss_start:.4g} -> {self.loss_end:.4g}, {verdict}, {self.seconds:.1f}s")


class LearnRanges(GraphPass[LearnRangesPlan]):
    """Learn every activation quantizer's range against the model output (see module docstring).

    Runs on calibrated observers, before :class:`ConvertToFakeQuant`; ``weight_spec`` and
    ``embedding_spec`` must be the ones the conversion will use. ``tie_groups``: one learned pair
    per quantizer instead of one per group (see :class:`LearnableRange`).
    """

    output_rel_tol = 0.0  # observers keep returning their input; only their ranges change
    trains_or_searches = True  # Adam steps through a checkpointed forward

    def __init__(self, batches: Sequence[Mapping[str, torch.Tensor]], weight_spec: QuantSpec | None,
                 embedding_spec: QuantSpec | None = None, steps: int = 200, lr: float = 5e-3,
                 max_batches: int = 8, check_every: int = 20, tie_groups: bool = False,
                 progress: bool = False) -> None:
        if not batches:
            raise ValueError("learning ranges needs calibration batches")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.batches = [dict(b) for b in list(batches)[:max_batches]]
        self.weight_spec, self.embedding_spec = weight_spec, embedding_spec
        self.steps, self.lr, self.check_every, self.progress = steps, lr, check_every, progress
        self.tie_groups = tie_groups

    def analyze(self, gm: torch.fx.GraphModule) -> LearnRangesPlan:
        start = time.perf_counter()
        observers = {n: m for n, m in gm.named_children() if isinstance(m, Observer)}
        if not observers:
            raise PassError("no activation observers to learn ranges for; run InsertObservers first")
        if not all(o.calibrated for o in observers.values()):
            raise PassError("LearnRanges needs calibrated observers; run calibrate() first")
        schedule = Schedule(self.steps, my_batches(len(self.batches)), first=1)
        with torch.no_grad(), observation_paused():  # the targets of this rank's batches only
            targets = {i: self._float_outputs(gm, self.batches[i]) for i in schedule.mine}
        work = ConvertToFakeQuant(self.weight_spec, self.embedding_spec)(copy_graph_module(gm)).graph_module
        learnable = {n: LearnableRange(o, tied=self.tie_groups) for n, o in observers.items()}
        for name, module in learnable.items():
            if not isinstance(getattr(work, name), FakeQuantize):
                raise PassError(f"{name} did not become a fake quantizer")
            setattr(work, name, module)
        params = [p for m in learnable.values() for p in (m.u_lo, m.u_hi)]

        def loss_of(i: int) -> torch.Tensor:
            return masked_mse(differentiable_forward(work, self.batches[i]), targets[i],
                              self.batches[i].get("attention_mask"))

        def full_loss() -> float:  # over all ranks' batches: every rank keeps the same snapshot
            return mean_loss(loss_of, schedule.mine, len(self.batches))

        def snapshot() -> dict[str, tuple[torch.Tensor, ...]]:
            return {n: tuple(t.detach().clone() for t in m.bounds()) for n, m in learnable.items()}

        # STE gradients ignore rounding jumps: check the true loss now and then, keep the best
        loss_start = best_loss = full_loss()
        best, best_step = snapshot(), 0
        check_every = max(self.check_every, len(self.batches))
        optimizer = torch.optim.Adam(params, lr=self.lr)
        annealing = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, schedule.optimizer_steps)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=schedule.optimizer_steps, desc="learning quantizer ranges", unit="step")
        for t in range(schedule.optimizer_steps):
            step(params, optimizer, loss_of, schedule, t)
            annealing.step()
            done = schedule.done(t)  # single-process steps: a check every check_every of them
            if done // check_every > (done - schedule.covered(t)) // check_every or done == self.steps:
                current = full_loss()
                if current < best_loss:
                    best_loss, best, best_step = current, snapshot(), done
                if bar is not None:
                    bar.set_postfix(loss=f"{current:.4g}", best=f"{best_loss:.4g}")
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()
        # every rank took the same averaged steps and checks; rank 0's ranges everywhere still
        # guarantee that ranks on different CPUs cannot drift apart
        chosen = torch.tensor(best_step)
        distributed.broadcast_from_main([chosen, *(t for bounds in best.values() for t in bounds)])
        best_step = int(chosen)
        return LearnRangesPlan(best, sum(p.numel() for p in params), self.steps, best_step, loss_start, best_loss,
                               best_step == 0, time.perf_counter() - start)

    @staticmethod
    def _float_outputs(gm: torch.fx.GraphModule, batch: Mapping[str, torch.Tensor]) -> object:
        """``gm(**batch)``; in block order on a graph captured without weights."""
        if gm.meta.get(meta.GM_WEIGHT_SOURCE) is None:
            return gm(**batch)
        return run_in_block_order(gm, [batch]).outputs[0]

    def apply(self, gm: torch.fx.GraphModule, plan: LearnRangesPlan) -> bool:
        if plan.kept_start:
            return False
        for name, (lo, hi) in plan.ranges.items():
            setattr(gm, name, getattr(gm, name).with_learned_range(lo, hi))
        return not plan.kept_start
