"""Run a graph and hand chosen intermediate tensors to a callback, without changing the graph."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from ..errors import DataError


class _Probe(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, watched: set[torch.fx.Node], callback: Callable) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.watched = watched
        self.callback = callback

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        if n in self.watched:
            self.callback(n, value)
        return value


def probe(
    gm: torch.fx.GraphModule,
    nodes: Iterable[torch.fx.Node],
    inputs: tuple[tuple, dict],
    callback: Callable[[torch.fx.Node, torch.Tensor], None],
) -> None:
    """Execute ``gm`` on ``inputs`` and call ``callback(node, value)`` for each watched node."""
    args, kwargs = inputs
    flat = flatten_inputs(gm, args, kwargs)
    with torch.no_grad():
        _Probe(gm, set(nodes), callback).run(*flat)


def flatten_inputs(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> list[Any]:
    """Placeholder values in order, flattened the way the graph's calling convention does."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    return flatten_with_spec(info.in_spec if info is not None else None, args, kwargs)


def flatten_with_spec(spec: pytree.TreeSpec | None, args: tuple, kwargs: dict) -> list[Any]:
    """``(args, kwargs)`` flattened in the order of an input spec (keyword order may differ)."""
    if spec is not None and spec.num_children == 2 and kwargs:
        expected = list(spec.child(1).context)
        if set(expected) != set(kwargs):
            raise DataError(f"the graph was captured with inputs {expected}, got {sorted(kwargs)}")
        kwargs = {k: kwargs[k] for k in expected}
    return pytree.tree_leaves((args, kwargs))


def values_read_after(gm: torch.fx.GraphModule, boundary: int) -> list[torch.fx.Node]:
    """Nodes before position ``boundary`` whose value a node at or after it reads (placeholders
    always included): what to cache to resume execution at ``boundary``."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    return [n for n in nodes[:boundary]
            if n.op == "placeholder" or any(order[u] >= boundary for u in n.users)]


def run_nodes(gm: torch.fx.GraphModule, env: dict[torch.fx.Node, Any], start: int, stop: torch.fx.Node
              ) -> dict[torch.fx.Node, Any]:
    """Evaluate the nodes from position ``start`` through ``stop``, reading earlier values from
    ``env`` (e.g. cached with :func:`values_read_after`); returns the extended environment.
    Runs under the caller's autograd mode, so a segment of the graph can be trained."""
    interpreter = torch.fx.Interpreter(gm, garbage_collect_values=False)
    interpreter.env = dict(env)
    for node in list(gm.graph.nodes)[start:]:
        if node not in interpreter.env:
            interpreter.env[node] = interpreter.run_node(node)
        if node is stop:
            break
    return interpreter.env
