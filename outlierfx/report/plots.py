"""The audit report's figures, rendered to PNG data URIs (the HTML file embeds them)."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

from ..analysis import TensorOutliers, plot_heatmaps
from ..quantizers.qerror import TensorQuantError

# SQNR bands for the bar colours (dB): below LOW a tensor loses most of its information at this
# width, above HIGH it is close to what 8 bits give a well-spread signal.
LOW_DB, HIGH_DB = 15.0, 30.0


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def outlier_figure(before: Sequence[TensorOutliers], after: Sequence[TensorOutliers] | None,
                   after_label: str, title: str) -> bytes:
    """``analysis.plot_heatmaps`` (layer x channel max |x| heatmaps and per-layer ranges) as PNG."""
    panels = [("captured", before)] + ([(after_label, after)] if after is not None else [])
    buffer = io.BytesIO()
    plot_heatmaps(panels, buffer, title)  # savefig accepts a binary file object
    return buffer.getvalue()


def _short(row: TensorQuantError) -> str:
    name = row.tensor
    if row.block and name.startswith(row.block + "."):
        name = name[len(row.block) + 1:]
    elif name == row.block:
        name = "(block)"
    role = row.roles[0] if len(row.roles) == 1 else "+".join(r.split("_")[0] for r in row.roles)
    return f"{name} [{role}]" if role else name


def quant_error_figure(rows: Sequence[TensorQuantError], title: str, columns: int = 3) -> bytes:
    """One horizontal bar chart per layer (transformer block): SQNR of each quantized tensor."""
    plt = _pyplot()
    blocks: dict[str, list[TensorQuantError]] = {}
    for row in rows:
        blocks.setdefault(row.block or "?", []).append(row)
    finite = [r.sqnr_db for r in rows if math.isfinite(r.sqnr_db)]
    top = max(finite, default=40.0) + 5.0
    bottom = min(0.0, min(finite, default=0.0))
    columns = max(1, min(columns, len(blocks)))
    grid_rows = math.ceil(len(blocks) / columns)
    tallest = max(len(v) for v in blocks.values())
    fig, axes = plt.subplots(grid_rows, columns, figsize=(4.4 * columns, 0.8 + grid_rows * (0.6 + 0.17 * tallest)),
                             squeeze=False, constrained_layout=True)
    for ax, (block, members) in zip(axes.flat, blocks.items()):
        values = [r.sqnr_db if math.isfinite(r.sqnr_db) else top for r in members]
        colours = ["#9aa5b1" if not math.isfinite(r.sqnr_db)
                   else "#c0392b" if r.sqnr_db < LOW_DB else "#e67e22" if r.sqnr_db < HIGH_DB else "#2e8b57"
                   for r in members]
        positions = range(len(members))
        ax.barh(positions, values, color=colours)
        for pos, r in zip(positions, members):
            if not math.isfinite(r.sqnr_db):
                ax.text(top, pos, "exact ", va="center", ha="right", fontsize=7, color="white")
        ax.set_yticks(list(positions), [_short(r) for r in members], fontsize=7)
        ax.invert_yaxis()  # graph order, top to bottom
        ax.set_xlim(bottom, top)
        ax.axvline(LOW_DB, color="#c0392b", lw=0.6, ls="--")
        ax.axvline(HIGH_DB, color="#2e8b57", lw=0.6, ls="--")
        ax.set_title(block, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    for ax in list(axes.flat)[len(blocks):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("SQNR (dB)", fontsize=8)
    fig.suptitle(title, fontsize=11)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
