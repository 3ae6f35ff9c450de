"""What the training passes share: the task loss and an Adam loop with a progress bar."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.fx

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


def task_loss(reference: torch.fx.GraphModule, batches: Sequence[Batch], kind: str = "auto") -> tuple[
        str, Callable[[object, int], torch.Tensor]]:
    """``(kind, loss(output, batch_index))``: ``"lm"`` (models returning logits on ``input_ids``) or
    ``"distill"``, the masked output MSE against ``reference`` (run once here, observers paused)."""
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
        targets = [reference(**b) for b in batches]
    return kind, lambda out, i: masked_mse(out, targets[i], batches[i].get("attention_mask"))


def fit(params: Sequence[torch.nn.Parameter], loss_of: Callable[[int], torch.Tensor], batches: int, steps: int,
        lr: float, desc: str, progress: bool = False) -> list[float]:
    """Adam on ``params``, cosine-annealed over ``steps``, cycling through ``batches`` batch indices.
    Returns the mean loss before training, then per pass through the batches (a partial last pass
    included)."""
    with torch.no_grad():
        losses = [sum(float(loss_of(i)) for i in range(batches)) / batches]
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=desc, unit="step")
    running, count = 0.0, 0
    for step in range(steps):
        loss = loss_of(step % batches)
        optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=list(params))
        optimizer.step()
        schedule.step()
        running, count = running + float(loss.detach()), count + 1
        if count == batches or step == steps - 1:
            losses.append(running / count)
            running, count = 0.0, 0
        if bar is not None:
            bar.update()
            bar.set_postfix(loss=f"{float(loss.detach()):.4g}")
    if bar is not None:
        bar.close()
    return losses
