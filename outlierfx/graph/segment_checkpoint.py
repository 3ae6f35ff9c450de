"""A differentiable forward of a graph captured without weights, one block's weights at a time.

A pass that trains on the whole model's output (LearnRanges) needs a forward whose backward
reaches every block; the backward of a Linear needs its weight, so an ordinary forward would
keep every block's weights alive until the backward. Here the graph runs segment by segment
(each block's nodes, and the nodes between blocks: :func:`~.block_order.segments_of`), each
segment under non-reentrant activation checkpointing (:func:`torch.utils.checkpoint.checkpoint`)
with the weights its nodes read loaded inside: the forward releases them as the segment ends,
and the backward runs the segment again, loading them again, when it needs what the segment
saved. The autograd graph is the one an ordinary forward records (non-reentrant checkpointing
only replaces what the ops save by a recomputation), so the gradients, their accumulation
order included, are the whole-graph run's bit for bit; only one segment's saved tensors, its
weights among them, live at a time in the backward.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx
from torch.utils.checkpoint import checkpoint

from . import meta
from .attrs import fetch_attr
from .block_order import segments_of
from .weight_source import materialized


def differentiable_forward(gm: torch.fx.GraphModule, batch: Mapping[str, Any]) -> Any:
    """``gm(**batch)``, differentiable, for a graph holding its weights or captured without them
    (then segment by segment with checkpointing: see the module docstring)."""
    source = gm.meta.get(meta.GM_WEIGHT_SOURCE)
    if source is None:
        return gm(**batch)
    stored = {n for n in gm.graph.nodes if n.op == "get_attr" and n.target in source.tensors}
    output = gm.graph.output_node()
    bound = inspect.signature(gm.forward).bind(**batch)
    bound.apply_defaults()
    env: dict[torch.fx.Node, Any] = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"],
                                             gm.graph.process_inputs(*bound.args)))
    segments = segments_of(gm, [n for n in gm.graph.nodes if n.op not in ("placeholder", "output") and
                                n not in stored])
    position = {n: i for i, segment in enumerate(segments) for n in segment}
    for i, segment in enumerate(segments):
        members = set(segment)
        inputs = list(dict.fromkeys(a for n in segment for a in n.all_input_nodes if a not in members | stored))
        outputs = [n for n in segment if any(u is output or position.get(u, -1) > i for u in n.users)]
        results = checkpoint(_segment_runner(gm, segment, inputs, stored, outputs), *[env[a] for a in inputs],
                             use_reentrant=False)
        env.update(zip(outputs, results))
        for value in [v for v in env if v.op != "placeholder" and all(position.get(u, -1) <= i and u is not output
                                                                        for u in v.users)]:
            del env[value]  # no later segment reads it (checkpointing keeps what the backward needs)
    runner = torch.fx.Interpreter(gm)
    runner.env = env
    return gm.graph.process_outputs(runner.run_node(output))


def _segment_runner(gm: torch.fx.GraphModule, segment: Sequence[torch.fx.Node], inputs: Sequence[torch.fx.Node],
                    stored: set[torch.fx.Node], outputs: Sequence[torch.fx.Node]):
    """The segment as a function of its inputs' values, loading the weights it reads while it runs."""
    attrs = list(dict.fromkeys(a for n in segment for a in n.all_input_nodes if a in stored))

    def run(*values: Any) -> tuple[Any, ...]:
        with materialized(gm, [str(a.target) for a in attrs]):
            runner = torch.fx.Interpreter(gm)
            runner.env = dict(zip(inputs, values))
            runner.env.update({a: fetch_attr(gm, str(a.target)) for a in attrs})
            for node in segment:
                runner.env[node] = runner.run_node(node)
            return tuple(runner.env[n] for n in outputs)

    return run
