"""Outlier analysis: where a model's activations carry outlier channels, and on which tokens.

For every norm output and every residual sum of a captured graph, over calibration batches
(padding tokens excluded): max |x|, the range, each channel's max |x|, the top channels and the
tokens that carry them, and the share of the per-tensor range that only the top 1% of channels
need (``top1pct_range_share``: 0.9 means that without those channels the range would be 10x
smaller, i.e. per-tensor 8-bit quantization spends 90% of its grid on them).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx

from .errors import DataError
from .graph import meta
from .graph.probe import probe
from .graph.view import GraphView

TOP_K = 5


@dataclasses.dataclass(frozen=True)
class TensorOutliers:
    node: str
    module_path: str
    role: str  # "norm_output" or "residual_sum"
    max_abs: float
    min: float
    max: float
    channel_max_abs: np.ndarray  # (hidden,)
    top_channels: tuple[int, ...]
    top_tokens: tuple[tuple[int, str, int], ...]  # (channel, token carrying its max, #times it was the max token)
    top1pct_range_share: float

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["channel_max_abs"] = [round(float(v), 5) for v in self.channel_max_abs]
        return out


class _Accumulator:
    """Per-channel min/max (and argmax token) of one tensor across batches."""

    def __init__(self) -> None:
        self.cmin: torch.Tensor | None = None
        self.cmax: torch.Tensor | None = None
        self.cabs_token: torch.Tensor | None = None  # token id at each channel's max |x|
        self.cabs: torch.Tensor | None = None
        self.token_votes: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)

    def update(self, value: torch.Tensor, token_ids: torch.Tensor, keep: torch.Tensor) -> None:
        flat = value.detach().reshape(-1, value.shape[-1])[keep].float()
        ids = token_ids.reshape(-1)[keep]
        if flat.numel() == 0:
            return
        cmin, cmax = flat.min(0).values, flat.max(0).values
        absval = flat.abs()
        cabs, where = absval.max(0)
        tokens = ids[where]
        if self.cmin is None:
            self.cmin, self.cmax, self.cabs, self.cabs_token = cmin, cmax, cabs, tokens
        else:
            self.cmin, self.cmax = torch.minimum(self.cmin, cmin), torch.maximum(self.cmax, cmax)
            better = cabs > self.cabs
            self.cabs = torch.where(better, cabs, self.cabs)
            self.cabs_token = torch.where(better, tokens, self.cabs_token)
        for channel in torch.topk(cabs, min(TOP_K, cabs.numel())).indices.tolist():
            self.token_votes[channel][int(tokens[channel])] += 1


def analyze_outliers(
    gm: torch.fx.GraphModule,
    batches: Iterable[Mapping[str, torch.Tensor]],
    tokenizer: Any = None,
    progress: bool = False,
) -> list[TensorOutliers]:
    """Statistics of every norm output and residual sum of ``gm`` over ``batches``.

    Batches are keyword inputs of the graph (``input_ids`` and ``attention_mask``); tokens where
    ``attention_mask`` is 0 are left out.
    """
    view = GraphView(gm)
    watched: dict[torch.fx.Node, str] = {s.norm: "norm_output" for s in view.norm_sites}
    watched.update({r.add: "residual_sum" for r in view.residual_adds})
    if not watched:
        raise DataError("the graph has no norm or residual add to analyze")
    acc = {node: _Accumulator() for node in watched}
    batches = list(batches)
    if not batches:
        raise DataError("no calibration batches to analyze")
    iterator: Iterable = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="outlier analysis", unit="batch")
    for batch in iterator:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        keep = (mask.reshape(-1) > 0) if mask is not None else torch.ones(ids.numel(), dtype=torch.bool)

        def record(node: torch.fx.Node, value: torch.Tensor) -> None:
            if value.dim() >= 2 and value.shape[:2] == ids.shape:
                acc[node].update(value, ids, keep)

        probe(gm, watched, ((), dict(batch)), record)

    results = []
    for node in sorted(watched, key=view.order.__getitem__):
        a = acc[node]
        if a.cmin is None:
            continue
        results.append(_summarize(node, watched[node], a, tokenizer))
    return results


def _summarize(node: torch.fx.Node, role: str, a: _Accumulator, tokenizer: Any) -> TensorOutliers:
    cabs = a.cabs.numpy()
    order = np.argsort(-cabs)
    top = tuple(int(c) for c in order[:TOP_K])
    lo, hi = float(a.cmin.min()), float(a.cmax.max())
    n_top = max(1, math.ceil(0.01 * cabs.size))
    rest = np.ones(cabs.size, dtype=bool)
    rest[order[:n_top]] = False
    rest_range = float(a.cmax[torch.from_numpy(rest)].max() - a.cmin[torch.from_numpy(rest)].min()) if rest.any() else 0.0
    share = 1.0 - rest_range / (hi - lo) if hi > lo else 0.0

    def token_name(token_id: int) -> str:
        if tokenizer is None:
            return str(token_id)
        return str(tokenizer.convert_ids_to_tokens(int(token_id)))

    tokens = []
    for channel in top:
        votes = a.token_votes.get(channel)
        token_id, count = votes.most_common(1)[0] if votes else (int(a.cabs_token[channel]), 1)
        tokens.append((channel, token_name(token_id), int(count)))
    return TensorOutliers(
        node=node.name,
        module_path=meta.module_path(node),
        role=role,
        max_abs=float(cabs.max()),
        min=lo,
        max=hi,
        channel_max_abs=cabs,
        top_channels=top,
        top_tokens=tuple(tokens),
        top1pct_range_share=share,
    )


def format_table(before: Sequence[TensorOutliers], after: Sequence[TensorOutliers] | None = None) -> str:
    """One row per tensor; with ``after``, the range before and after and how much it shrank."""
    after_by_node = {t.node: t for t in after or ()}
    header = f"{'tensor':52} {'role':13} {'max|x|':>9} {'range':>9} {'top1%':>6}  top channels (token)"
    if after is not None:
        header += f"   {'range after':>11} {'shrink':>7}"
    lines = [header]
    for t in before:
        tops = ", ".join(f"{c}({tok})" for c, tok, _ in t.top_tokens[:3])
        row = (f"{(t.module_path or t.node)[:52]:52} {t.role:13} {t.max_abs:9.2f} {t.max - t.min:9.2f} "
               f"{t.top1pct_range_share:6.2f}  {tops}")
        if after is not None and t.node in after_by_node:
            new = after_by_node[t.node]
            new_range = new.max - new.min
            row += f"   {new_range:11.2f} {((t.max - t.min) / new_range if new_range else float('inf')):6.2f}x"
        lines.append(row)
    return "\n".join(lines)


def plot_heatmaps(panels: Sequence[tuple[str, Sequence[TensorOutliers]]], path: str, title: str) -> None:
    """Layer x channel heatmaps of per-channel max |x| (log scale), one panel per stage, plus a
    per-layer range plot comparing the stages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    norms = [[t for t in tensors if t.role == "norm_output"] for _, tensors in panels]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(6 * (len(panels) + 1), 5), constrained_layout=True)
    values = np.concatenate([t.channel_max_abs for group in norms for t in group])
    vmax = float(values.max())
    vmin = max(1e-2, float(np.percentile(values, 1)))  # a dead channel must not wash out the scale
    for ax, (label, _), group in zip(axes, panels, norms):
        matrix = np.stack([np.maximum(t.channel_max_abs, vmin) for t in group])
        image = ax.imshow(matrix, aspect="auto", interpolation="nearest", norm=LogNorm(vmin=vmin, vmax=vmax), cmap="magma")
        ax.set_title(f"norm outputs: {label}")
        ax.set_xlabel("channel")
        ax.set_ylabel("norm site (layer order)")
    fig.colorbar(image, ax=axes[: len(panels)], shrink=0.8, label="max |x| over calibration tokens")
    ax = axes[-1]
    for (label, _), group in zip(panels, norms):
        ax.plot([t.max - t.min for t in group], marker="o", label=label)
    ax.set_yscale("log")
    ax.set_title("per-tensor range of each norm output")
    ax.set_xlabel("norm site (layer order)")
    ax.set_ylabel("max - min")
    ax.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
