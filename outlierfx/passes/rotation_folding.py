"""Folding an orthogonal rotation into stored tensors: what every rotation pass shares.

A rotation pass multiplies some activation by an orthogonal matrix Q and keeps the model's
function by giving the weights on either side the inverse. Two moves cover every case:
- ``RIGHT`` (``W -> W Q``): a tensor whose last axis *reads* the rotated basis (a Linear reading
  rotated inputs, an embedding table or bias that *is* a rotated row);
- ``LEFT`` (``W -> Q^T W``): a Linear weight whose rows *write* into the rotated basis.
A Q smaller than the axis is applied block-diagonally, one block per consecutive chunk (per
attention head). Products are taken in float64 and rounded once to the tensor's dtype.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.fx

from ..graph.attrs import fetch_attr, set_attr

RIGHT, LEFT = "W Q", "Q^T W"

Use = tuple[torch.fx.Node, Any, str]  # (consumer, its tensor argument to rotate, RIGHT or LEFT)


def rotated(value: torch.Tensor, q: torch.Tensor, how: str) -> torch.Tensor:
    """``value @ Q`` (``RIGHT``, on the last axis) or ``Q^T @ value`` (``LEFT``, on the rows),
    block-diagonally where ``Q`` is smaller than that axis."""
    v, n = value.detach().double(), q.shape[0]
    if how == RIGHT:
        out = (v.reshape(*v.shape[:-1], -1, n) @ q).reshape(v.shape)
    else:
        out = (q.T @ v.reshape(-1, n, v.shape[-1])).reshape(v.shape)
    return out.to(value.dtype)


def fold(gm: torch.fx.GraphModule, targets: dict[str, tuple[str, torch.Tensor]]) -> None:
    """Replace each stored tensor ``target`` by ``rotated(tensor, q, how)`` (parameters stay
    parameters, frozen)."""
    for target, (how, q) in targets.items():
        old = fetch_attr(gm, target)
        value = rotated(old, q, how)
        set_attr(gm, target, torch.nn.Parameter(value, requires_grad=False)
                 if isinstance(old, torch.nn.Parameter) else value)


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
