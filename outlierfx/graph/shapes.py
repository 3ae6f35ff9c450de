"""Re-propagating ``meta["val"]`` after a rewrite, with the symbolic shapes export produced."""

from __future__ import annotations

import torch
import torch.fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp


def propagate_values(gm: torch.fx.GraphModule) -> None:
    """Recompute every node's ``val`` (shape, dtype, device) from the placeholders' values.

    Uses the graph's own fake mode, so dynamic batch and sequence sizes stay symbolic.
    Parameters are real tensors; they are converted to fakes on the fly.
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
        FakeTensorProp(gm, existing).propagate_dont_convert_inputs(*inputs)
    finally:
        existing.allow_non_fake_inputs = previous
