"""Running a graph over several inputs node by node, all inputs advancing together.

A caller that steps every run through one node before the next can change a value between
nodes (sequential GPTQ writes each Linear's rounded weight as its input's statistics arrive) or
load and free weights as the runs go (block-order calibration of a graph captured without
weights, :mod:`.block_order`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx


class Lockstep(torch.fx.Interpreter):
    """One batch's run of a graph, advanced one node at a time by the caller; values are freed
    after their last reader, as :meth:`torch.fx.Interpreter.run` frees them, or after the last
    reader in ``last_uses`` (node -> the values to free once it has run) where the caller runs
    only some of the nodes."""

    def __init__(self, gm: torch.fx.GraphModule, batch: Mapping[str, Any],
                 last_uses: Mapping[torch.fx.Node, list[torch.fx.Node]] | None = None) -> None:
        super().__init__(gm)
        bound = inspect.signature(gm.forward).bind(**batch)
        bound.apply_defaults()
        flat = gm.graph.process_inputs(*bound.args)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.env.update(zip(placeholders, flat))
        self.inputs = batch  # by name, as given
        mask = batch.get("attention_mask")
        self.mask = None if mask is None else mask.bool()
        self.last_uses = self.user_to_last_uses if last_uses is None else last_uses

    def step(self, node: torch.fx.Node) -> Any:
        """Run ``node``; returns its value (also when no later node reads it, so it is freed)."""
        if node.op in ("placeholder", "output"):
            return None
        value = self.env[node] = self.run_node(node)
        for freed in self.last_uses.get(node, []):
            del self.env[freed]
        return value
