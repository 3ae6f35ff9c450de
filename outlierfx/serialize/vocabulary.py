"""The op vocabulary of saved graphs: the functions a saved graph may call, by name.

A saved graph names each ``call_function`` target; loading resolves the name here and nowhere
else (no import by name, no unpickling), so a file can only call:
- an aten operator, by ``"aten.<name>.<overload>"``: a tensor kernel, which cannot reach files
  or run Python (an in-place one only changes tensors the file defines anyway). Any of them,
  not a hand list: the ops a captured graph holds change with the architecture and the torch
  release (MPNet's relative-position buckets call ``log``, GPT-NeoX splits with ``chunk``, and
  exported mask code adds in place);
- one of outlierfx's own functions or registered torch ops in :data:`OPS` (one line each).
Names are stable: renaming an entry of :data:`OPS` makes older files unreadable.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch

from ..graph.first_tokens import first_token_mask
from ..graph.hadamard_op import HADAMARD

OPS: dict[str, Callable[..., Any]] = {
    "operator.getitem": operator.getitem,
    # shape arithmetic on symbolic sizes (BLOOM's ALiBi slopes multiply batch by heads)
    **{f"operator.{name}": getattr(operator, name) for name in ("add", "sub", "mul", "floordiv", "truediv", "mod",
                                                                 "neg")},
    "torch.ops.outlierfx.hadamard.default": HADAMARD,  # RotateFFN's online Hadamard transform
    # which tokens +sink quantizers put on their first-token grid
    "outlierfx.graph.first_tokens.first_token_mask": first_token_mask,
}
"""Name -> function: the ``call_function`` targets beyond aten operators."""

_ATEN = "aten."


def name_of(target: object) -> str | None:
    """The vocabulary name of a graph node's target, or None where a saved graph may not call it."""
    for name, fn in OPS.items():
        if fn is target:
            return name
    if _is_aten(target):
        return f"{_ATEN}{target._schema.name.split('::', 1)[1]}.{target._overloadname}"
    return None


def target_of(name: str) -> Callable[..., Any] | None:
    """The function a saved name stands for, or None for a name this table does not allow."""
    if name in OPS:
        return OPS[name]
    if not name.startswith(_ATEN) or name.count(".") != 2:
        return None
    _, op, overload = name.split(".")
    packet = getattr(torch.ops.aten, op, None) if not op.startswith("__") or op.endswith("__") else None
    target = getattr(packet, overload, None) if isinstance(packet, torch._ops.OpOverloadPacket) else None
    return target if _is_aten(target) else None


def _is_aten(target: object) -> bool:
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "aten"
