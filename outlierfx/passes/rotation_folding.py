"""Folding an orthogonal rotation into stored tensors: what every rotation pass shares.

A rotation pass multiplies some activation by an orthogonal matrix Q and keeps the model's
function by giving the weights on either side the inverse. Two moves cover every case:
- ``RIGHT`` (``W -> W Q``): a tensor whose last axis *reads* the rotated basis (a Linear reading
  rotated inputs, an embedding table or bias that *is* a rotated row);
- ``LEFT`` (``W -> Q^T W``): a Linear weight whose rows *write* into the rotated basis.
A Q smaller than the axis is applied block-diagonally, one block per consecutive chunk (per
attention head). Products are taken in float64 and rounded once to the tensor's dtype. On a
graph captured without weights the rotation is recorded and computed when the tensor is loaded
(:func:`~outlierfx.graph.weight_source.rewrite_tensor`), by the same function.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx

from ..graph.weight_source import rewrite_tensor

RIGHT, LEFT = "W Q", "Q^T W"

Use = tuple[torch.fx.Node, Any, str]  # (consumer, its tensor argument to rotate, RIGHT or LEFT)


CHUNK = 4096
"""Rows (``RIGHT``) or columns (``LEFT``) rotated at a time: the float64 products of a whole
embedding table would be 4x its size in temporaries (450 MB on SmolLM2's 49152 x 576), a
chunk's are a few MB. Each output row (column) depends on its own input row (column) only, and
both the full-memory path and a graph captured without weights rotate through here."""


def rotated(value: torch.Tensor, q: torch.Tensor, how: str, in_place: bool = False) -> torch.Tensor:
    """``value @ Q`` (``RIGHT``, on the last axis) or ``Q^T @ value`` (``LEFT``, on the rows),
    block-diagonally where ``Q`` is smaller than that axis; in float64, :data:`CHUNK` rows
    (columns) at a time, each rounded once to ``value``'s dtype. ``in_place``: written into
    ``value`` (contiguous), the same values: each chunk is copied out before it is overwritten."""
    v, n = value.detach(), q.shape[0]
    out = v if in_place else torch.empty(v.shape, dtype=v.dtype)
    if how == RIGHT:
        rows, out_rows = v.reshape(-1, v.shape[-1]), out.view(-1, v.shape[-1])
        # one pair of float64 buffers for all chunks: chunks allocated anew each time were kept
        # by glibc once freed (+140 MB of RSS after rotating SmolLM2's table)
        wide = torch.empty(min(CHUNK, rows.shape[0]), rows.shape[1], dtype=torch.float64)
        product = torch.empty_like(wide)
        for start in range(0, rows.shape[0], CHUNK):
            count = min(CHUNK, rows.shape[0] - start)
            chunk, rotated_chunk = wide[:count], product[:count]
            chunk.copy_(rows[start:start + count])
            torch.mm(chunk.view(-1, n), q, out=rotated_chunk.view(-1, n))  # each n-wide block of a row times Q
            out_rows[start:start + count].copy_(rotated_chunk)
    else:  # Linear weights writing the rotated basis (a few MB): a chunk's temporaries are small
        for start in range(0, v.shape[-1], CHUNK):
            chunk = v[..., start:start + CHUNK].double()
            out[..., start:start + CHUNK] = (q.T @ chunk.reshape(-1, n, chunk.shape[-1])).reshape(chunk.shape)
    return value if in_place else out


def fold(gm: torch.fx.GraphModule, targets: dict[str, tuple[str, torch.Tensor]], by: str) -> None:
    """Replace each stored tensor ``target`` by ``rotated(tensor, q, how)`` (parameters stay
    parameters, frozen); on a graph captured without weights, a rotation computed when the
    tensor is loaded (:func:`~outlierfx.graph.weight_source.rewrite_tensor`). ``by`` names the
    pass."""
    for target, (how, q) in targets.items():
        rewrite_tensor(gm, target, functools.partial(rotated, q=q, how=how), f"{by}: {how}",
                       in_place=functools.partial(rotated, q=q, how=how, in_place=True))


def check_tensors(gm: torch.fx.GraphModule, uses: Iterable[Use], blockers: list[tuple[str, str]],
                  where: Any) -> tuple[str, ...]:
    """Every tensor to rotate must be a stored tensor whose every reader wants the same rotation
    (a tied embedding and lm_head both want E Q); ``blockers`` gets each one that is not, named
    by ``where(node)``. Returns the targets read by several ops (rotated once, kept shared)."""
    wanted: dict[str, set[tuple[torch.fx.Node, str]]] = {}
    for node, tensor, how in uses:
        if not isinstance(tensor, torch.fx.Node) or tensor.op != "get_attr":
            blockers.append((where(node), "its weight or bias is computed, not a parameter"))
            continue
        wanted.setdefault(str(tensor.target), set()).add((node, how))
    readers: dict[str, set[torch.fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr" and str(n.target) in wanted:
            readers.setdefault(str(n.target), set()).update(n.users)
    for target, found in wanted.items():
        if len({how for _, how in found}) > 1:
            blockers.append((target, "needs two different rotations (read and written by the rotated values)"))
        elif readers[target] - {node for node, _ in found}:
            blockers.append((target, "shared with an op outside the rotated values"))
    return tuple(sorted(t for t, r in readers.items() if len(r) > 1))


def linear_uses(readers: Iterable[torch.fx.Node], writers: Iterable[torch.fx.Node]) -> list[Use]:
    """The tensor uses of Linears reading rotated inputs (``W Q``) and Linears writing rotated
    outputs (``Q^T W``, and their bias ``b Q``)."""
    uses: list[Use] = [(n, n.args[1], RIGHT) for n in readers]
    for n in writers:
        uses.append((n, n.args[1], LEFT))
        if len(n.args) > 2 and n.args[2] is not None:
            uses.append((n, n.args[2], RIGHT))  # the bias is a row of the output: b Q
    return uses
