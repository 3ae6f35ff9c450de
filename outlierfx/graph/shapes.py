"""Re-propagating ``meta["val"]`` after a rewrite, with the symbolic shapes export produced."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp


class _IncrementalProp(FakeTensorProp):
    """Reuses the ``val`` of nodes that have one; computes it only for the others."""

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op != "output" and "val" in n.meta:
            return n.meta["val"]
        return super().run_node(n)


def propagate_values(gm: torch.fx.GraphModule, *, full: bool = False) -> None:
    """Compute ``val`` (shape, dtype, device) for nodes that lack it, or for all with ``full``.

    Uses the graph's own fake mode, so dynamic batch and sequence sizes stay symbolic.
    Incremental propagation relies on the pass contract: a pass that changes the shape or
    dtype of an existing node deletes that node's ``val``. (A full pass over SmolLM2 takes ~9 s.)
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = [n.meta.get("val") for n in placeholders]
    existing = detect_fake_mode(tuple(v for v in inputs if isinstance(v, torch.Tensor)))
    if existing is None:
        existing = FakeTensorMode(allow_non_fake_inputs=True)
        inputs = [existing.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in inputs]
    previous = existing.allow_non_fake_inputs
    existing.allow_non_fake_inputs = True
    try:
        prop = FakeTensorProp if full else _IncrementalProp
        prop(gm, existing).propagate_dont_convert_inputs(*inputs)
    finally:
        existing.allow_non_fake_inputs = previous
