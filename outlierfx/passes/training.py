"""What the training passes share: the task loss, the data-parallel optimizer step and an Adam
loop with a progress bar.

Data-parallel training (under torch.distributed, see docs/distributed.md): a single process
trains step ``s`` on batch ``s % batches``. With ``W`` ranks the run takes ``ceil(steps / W)``
optimizer steps; step ``t`` stands for the single-process steps ``t*W .. t*W+W-1`` (fewer at the
end), one per rank, and rank ``r`` takes its own batches (``r, r+W, ...``, the calibration shard)
in turn, which are exactly the single-process step's batches when ``W`` divides the batch count.
Each rank backpropagates its batch's loss, the gradients and losses are summed in one
all_reduce and divided by the number of batches the step covered, so each batch weighs the same
(its loss is already a mean over its real tokens), as in one process; every rank then takes the
same Adam step. Losses that decide something are means over all ranks' batches
(:func:`mean_loss`), so every rank decides the same. With one process all of this is the loop it
always was, bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.fx

from .. import distributed
from ..graph.compare import masked_mse
from ..quantizers.observers import observation_paused

Batch = Mapping[str, torch.Tensor]


def lm_loss(output: object, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose target token is real (attention mask)."""
    logits = output.logits  # type: ignore[attr-defined]
    targets = batch["input_ids"][:, 1:]
    mask = batch.get("attention_mask")
    if mask is not None:
        targets = targets.masked_fill(mask[:, 1:] == 0, -100)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             targets.reshape(-1), ignore_index=-100)


def my_batches(count: int) -> tuple[int, ...]:
    """The indices of this rank's batches among ``count`` (``rank, rank + world, ...``; all of
    them in one process): the ones it trains and evaluates on."""
    return tuple(distributed.shard(range(count)))


def task_loss(reference: torch.fx.GraphModule, batches: Sequence[Batch], kind: str = "auto",
              mine: Sequence[int] | None = None) -> tuple[str, Callable[[object, int], torch.Tensor]]:
    """``(kind, loss(output, batch_index))``: ``"lm"`` (models returning logits on ``input_ids``) or
    ``"distill"``, the masked output MSE against ``reference`` (run once here, observers paused,
    on the batches ``mine``: this rank's, see :func:`my_batches`)."""
    if kind not in ("auto", "lm", "distill"):
        raise ValueError(f"loss must be 'auto', 'lm' or 'distill', got {kind!r}")
    if kind == "auto":
        kind = "distill"
        if "input_ids" in batches[0]:
            with torch.no_grad(), observation_paused():
                kind = "lm" if hasattr(reference(**batches[0]), "logits") else "distill"
    if kind == "lm":
        return kind, lambda out, i: lm_loss(out, batches[i])
    with torch.no_grad(), observation_paused():
        targets = {i: reference(**batches[i]) for i in (my_batches(len(batches)) if mine is None else mine)}
    return kind, lambda out, i: masked_mse(out, targets[i], batches[i].get("attention_mask"))


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Which batch each rank trains on at each optimizer step (see the module docstring).

    ``steps`` single-process steps over the batches ``mine`` of this rank, ``first``: the batch
    position the first step takes (LearnRanges starts at batch 1)."""

    steps: int
    mine: tuple[int, ...]
    first: int = 0
    world: int = dataclasses.field(default_factory=distributed.world_size)
    rank: int = dataclasses.field(default_factory=distributed.rank)

    @property
    def optimizer_steps(self) -> int:
        return math.ceil(self.steps / self.world)

    def covered(self, t: int) -> int:
        """How many single-process steps (batches, over all ranks) optimizer step ``t`` stands for."""
        return min(self.world, self.steps - t * self.world)

    def done(self, t: int) -> int:
        """Single-process steps done once optimizer step ``t`` is taken."""
        return min((t + 1) * self.world, self.steps)

    def batch(self, t: int) -> int | None:
        """This rank's batch at optimizer step ``t`` (None: the last step has none left for it)."""
        if self.rank >= self.covered(t):
            return None
        return self.mine[(t + self.first) % len(self.mine)]


def mean_loss(loss_of: Callable[[int], torch.Tensor], mine: Sequence[int], batches: int) -> float:
    """The mean of ``loss_of`` over all ``batches`` (each batch weighs the same): this rank
    evaluates its own (``mine``), the sums are added across ranks, so every rank gets the same."""
    local, error = 0.0, None
    try:
        with torch.no_grad():
            local = sum(float(loss_of(i)) for i in mine)
    except Exception as exc:  # raised below, once every rank knows
        error = exc
    total, failures = distributed.sum_across_ranks([], [local, float(error is not None)])
    _raise_together(error, failures, "evaluating a training loss")
    return total / batches


def step(params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer, loss_of: Callable[[int], torch.Tensor],
         schedule: Schedule, t: int) -> float:
    """Optimizer step ``t``: this rank's batch loss backpropagated, gradients averaged over the
    step's batches on all ranks (one all_reduce, with the loss), the same update on every rank.
    Returns the summed loss of the step's batches."""
    optimizer.zero_grad(set_to_none=True)
    batch, loss, error = schedule.batch(t), 0.0, None
    try:
        if batch is not None:
            value = loss_of(batch)
            value.backward(inputs=list(params))
            loss = float(value.detach())
    except Exception as exc:  # raised below, once every rank knows
        error = exc
    if schedule.world == 1 and error is not None:
        raise error
    if schedule.world > 1:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]  # no batch here: adds 0
        loss, failures = distributed.sum_across_ranks(grads, [loss, float(error is not None)])
        _raise_together(error, failures, "training")
        covered = schedule.covered(t)
        for p, grad in zip(params, grads):
            p.grad = grad.div_(covered)
    optimizer.step()
    return loss


def _raise_together(error: Exception | None, failures: float, what: str) -> None:
    """After a collective that counted the ranks that failed: where any did, every rank raises
    (the failing one its own error, the others a DistributedError naming it) rather than waiting
    for it in the next collective; nothing where none failed."""
    if failures:
        with distributed.failing_together(what):
            if error is not None:
                raise error


def fit(params: Sequence[torch.nn.Parameter], loss_of: Callable[[int], torch.Tensor], batches: int, steps: int,
        lr: float, desc: str, progress: bool = False) -> list[float]:
    """Adam on ``params``, cosine-annealed, over ``steps`` single-process steps cycling through
    ``batches`` batch indices (data-parallel under torch.distributed: ``ceil(steps / world)``
    optimizer steps). Returns the mean loss before training, then per pass through the batches
    (a partial last pass included)."""
    schedule = Schedule(steps, my_batches(batches))
    losses = [mean_loss(loss_of, schedule.mine, batches)]
    optimizer = torch.optim.Adam(params, lr=lr)
    annealing = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(schedule.optimizer_steps, 1))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=schedule.optimizer_steps, desc=desc, unit="step")
    running, count = 0.0, 0
    for t in range(schedule.optimizer_steps):
        loss = step(params, optimizer, loss_of, schedule, t)
        annealing.step()
        running, count = running + loss, count + schedule.covered(t)
        if count >= batches or t == schedule.optimizer_steps - 1:
            losses.append(running / count)
            running, count = 0.0, 0
        if bar is not None:
            bar.update()
            bar.set_postfix(loss=f"{loss / schedule.covered(t):.4g}")
    if bar is not None:
        bar.close()
    return losses
