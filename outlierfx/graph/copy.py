"""Copying a GraphModule's structure without copying its weights."""

from __future__ import annotations

import copy
import dataclasses

import torch.fx

from . import meta
from .attrs import fetch_attr


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule with its own graph and module tree, sharing the tensors of ``gm``.

    Node names, node meta and the calling convention (pytree in/out specs) are kept. Passes work
    on such a copy and replace tensors instead of editing them, so the input graph (and the
    user's model, whose storage export shares) is never changed.
    """
    graph = torch.fx.Graph(tracer_cls=gm.graph._tracer_cls)
    graph._codegen = copy.copy(gm.graph._codegen)  # in/out specs are never mutated by passes
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    # graph_copy leaves the output node's meta behind; keep it for consumers that read it.
    graph.output_node().meta = dict(gm.graph.output_node().meta)
    new = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta = dict(gm.meta)
    source = new.meta.get(meta.GM_WEIGHT_SOURCE)
    if source is not None:
        # GraphModule copies only the attributes the graph reads: a tensor a pass stopped reading
        # (a migrated norm gain) is gone, and a graph captured without weights must not load it
        new.meta[meta.GM_WEIGHT_SOURCE] = dataclasses.replace(
            source, tensors={target: entry for target, entry in source.tensors.items() if _holds(new, target)})
    return new


def _holds(gm: torch.fx.GraphModule, target: str) -> bool:
    try:
        fetch_attr(gm, target)
    except AttributeError:
        return False
    return True


def release_tensors(gm: torch.fx.GraphModule) -> None:
    """Let an intermediate graph's tensors go while its nodes live on in an audit trail.

    Pass plans name nodes of the graph a pass produced, and a node reaches its GraphModule (and
    so every weight that graph holds) through ``node.graph.owning_module``. A pipeline that has
    moved on from ``gm`` cuts that link, so the audit keeps the structure it reports (names,
    meta, arguments) but not a copy of the weights per weight-rewriting pass (on SmolLM2 those
    copies were most of a quantize run's 5 GB peak). Call it only on graphs nobody runs again:
    ``gm`` itself stays usable as a module, its graph no longer knows its owner.
    """
    gm.graph.owning_module = None
