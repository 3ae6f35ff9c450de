"""Small helpers the canonicalization steps share to rewrite nodes."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx

from . import meta

STEP = "canonicalize"
"""What canonicalization records as the creator of the nodes it makes (``meta.CREATED_BY``)."""


def replace(old: torch.fx.Node, new: torch.fx.Node) -> None:
    old.replace_all_uses_with(new)
    old.graph.erase_node(old)


def substitute(old: torch.fx.Node, target: Callable, args: tuple, kwargs: dict | None = None) -> torch.fx.Node:
    """Insert ``target(*args, **kwargs)`` before ``old`` and route all of ``old``'s users to it.

    ``old`` itself is left for dead-code elimination (its inputs may still be in use)."""
    with old.graph.inserting_before(old):
        new = old.graph.call_function(target, args, kwargs or {})
    meta.inherit(new, old, STEP)
    new.meta["val"] = old.meta.get("val")
    old.replace_all_uses_with(new)
    return new


def bind(node: torch.fx.Node, positional: list[str], defaults: dict[str, object]) -> dict[str, object]:
    """``node``'s arguments by name: ``defaults``, then its positional args, then its kwargs."""
    bound = dict(defaults)
    bound.update(zip(positional, node.args))
    bound.update(node.kwargs)
    return bound
