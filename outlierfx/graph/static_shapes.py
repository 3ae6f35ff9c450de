"""Graphs captured with static shapes say so when called with other shapes.

A graph exported with the example's concrete sizes has them baked into its reshapes; export's
own input guards are stripped by canonicalization (:mod:`.canonicalize`), so without a check of
our own another batch or sequence length would fail deep inside the graph, or not at all. Each
tensor input gets one :func:`require_shape` node that raises a :class:`DataError` naming the
shapes the graph takes.
"""

from __future__ import annotations

import torch
import torch.fx

from ..errors import DataError
from . import meta

STEP = "static_shapes"


@torch.fx.node.has_side_effect  # kept by dead-code elimination although nothing reads its result
def require_shape(x: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
    """Raise a :class:`DataError` unless input ``name`` has the ``shape`` the graph was captured with."""
    if tuple(x.shape) != shape:
        raise DataError(
            f"input {name!r} has shape {tuple(x.shape)}, but this graph was captured with static shapes and takes "
            f"only {shape} (the capture report's notes say why dynamic shapes failed for this model); pad or "
            f"truncate inputs to {shape}, or capture and quantize with inputs of the shape you will run"
        )


def insert_shape_checks(gm: torch.fx.GraphModule) -> int:
    """Check every tensor input's shape at the top of the graph; returns the number of checks."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    tensors = [n for n in placeholders if isinstance(n.meta.get("val"), torch.Tensor)]
    if not tensors:
        return 0
    with gm.graph.inserting_after(placeholders[-1]):
        for node in reversed(tensors):  # each inserted right after the inputs: reversed keeps their order
            shape = tuple(int(s) for s in node.meta["val"].shape)
            check = gm.graph.call_function(require_shape, (node, shape, node.name))
            check.meta["val"] = None
            check.meta[meta.CREATED_BY] = STEP
    # export's own input check would advise re-exporting with dynamic shapes, which is what failed
    for key, hook in list(gm._forward_pre_hooks.items()):
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            del gm._forward_pre_hooks[key]
            gm._forward_pre_hooks_with_kwargs.pop(key, None)
    gm.recompile()
    return len(tensors)
