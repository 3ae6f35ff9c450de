"""Running a graph captured without weights block by block, with each block's weights loaded
only while its nodes run (issue 28's block-wise calibration).

The graph's nodes are cut into segments: each block's (``GraphView.blocks``) and the nodes
between blocks. Every batch goes through one segment before the next one starts, one batch
after the other (each batch a :class:`~.lockstep.Lockstep` run, paused at segment ends), so
only one block's weights need to be in memory: a block's tensors are loaded from the checkpoint
(:func:`~.weight_source.materialize`) before its segment runs and released after it; tensors
read outside any one block (the embedding table, the final norm, a tied LM head) are loaded
before the segment of their first reader and released after the segment of their last. Values
are freed after their last reader, so between segments only the boundary values of the batches
live on: the residual stream and the shared inputs (position embeddings, the mask).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ContextManager

import torch
import torch.fx

from ..memory import return_freed_memory
from . import meta
from .attrs import fetch_attr
from .lockstep import Lockstep
from .probe import probe
from .view import GraphView
from .weight_source import WeightSource, materialize, release


@dataclasses.dataclass(frozen=True)
class LoadUnit:
    """Checkpoint tensors loaded together: before ``first`` runs, released after ``last`` runs."""

    name: str  # the block's module path, or the tensor's target outside blocks
    first: torch.fx.Node
    last: torch.fx.Node
    targets: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class BlockOrderRun:
    """What :func:`run_in_block_order` did: the units it loaded, in load order, and each batch's
    graph outputs where they were wanted (``wanted=None``)."""

    units: tuple[LoadUnit, ...]
    outputs: tuple[Any, ...] | None


def _block_spans(gm: torch.fx.GraphModule, order: Mapping[torch.fx.Node, int]) -> list[tuple[int, int, str]]:
    """Each block (``GraphView.blocks``) as ``(start, end, name)``: its nodes are those whose
    position in the graph lies in ``(start, end]`` (after the stream value it reads, up to its
    last residual add)."""
    return [(order[b.sublayers[0].origin], order[b.sublayers[-1].add], b.path or f"block {b.index}")
            for b in GraphView(gm).blocks]


def _load_schedule(source: WeightSource, nodes: Sequence[torch.fx.Node], order: Mapping[torch.fx.Node, int],
                   spans: Sequence[tuple[int, int, str]]) -> list[LoadUnit]:
    """The load units of the checkpoint tensors that ``nodes`` (the nodes that will run, in
    graph order) read: one per block for the tensors only that block's nodes read, one per
    tensor for the others. Ordered by their first reader."""
    readers: dict[str, list[torch.fx.Node]] = {}
    for node in nodes:
        for attr in node.all_input_nodes:
            if attr.op == "get_attr" and attr.target in source.tensors:
                readers.setdefault(str(attr.target), []).append(node)
    grouped: dict[str, list[str]] = {}
    for target, reading in readers.items():
        inside = [name for start, end, name in spans if all(start < order[n] <= end for n in reading)]
        grouped.setdefault(inside[0] if inside else target, []).append(target)
    units = []
    for name, targets in grouped.items():
        reading = [n for t in targets for n in readers[t]]
        units.append(LoadUnit(name, min(reading, key=order.__getitem__), max(reading, key=order.__getitem__),
                              tuple(targets)))
    return sorted(units, key=lambda u: order[u.first])


def load_units(gm: torch.fx.GraphModule, nodes: Iterable[torch.fx.Node]) -> list[LoadUnit]:
    """The load units of the weight-source tensors that ``nodes`` read, ordered by their first
    reader: one per block for the tensors only that block's nodes read, one per tensor for the
    others (the units :func:`run_in_block_order` loads, for per-block weight work)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return _load_schedule(gm.meta[meta.GM_WEIGHT_SOURCE], sorted(nodes, key=order.__getitem__), order,
                          _block_spans(gm, order))


def _segments(nodes: Sequence[torch.fx.Node], order: Mapping[torch.fx.Node, int],
              spans: Sequence[tuple[int, int, str]]) -> list[list[torch.fx.Node]]:
    """``nodes`` cut into consecutive runs: each block's nodes, and the nodes between blocks."""
    segments: list[list[torch.fx.Node]] = []
    previous: object = object()
    for node in nodes:
        block = next((i for i, (start, end, _) in enumerate(spans) if start < order[node] <= end), None)
        if block != previous or not segments:
            segments.append([])
            previous = block
        segments[-1].append(node)
    return segments


def segments_of(gm: torch.fx.GraphModule, nodes: Iterable[torch.fx.Node]) -> list[list[torch.fx.Node]]:
    """``nodes`` of ``gm`` in graph order, cut into the segments a block-order run goes through:
    each block's nodes, and the nodes between blocks."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return _segments(sorted(nodes, key=order.__getitem__), order, _block_spans(gm, order))


def _last_uses(nodes: Sequence[torch.fx.Node]) -> dict[torch.fx.Node, list[torch.fx.Node]]:
    """Node -> the values to free once it has run, among ``nodes`` only; a value no node of
    ``nodes`` reads is freed as soon as it is made."""
    freed: set[torch.fx.Node] = set()
    last_uses: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for node in reversed(nodes):
        for value in node.all_input_nodes:
            if value not in freed:
                freed.add(value)
                last_uses.setdefault(node, []).append(value)
        if node not in freed:
            freed.add(node)
            last_uses.setdefault(node, []).append(node)
    return last_uses


def ancestors_of(nodes: Iterable[torch.fx.Node]) -> set[torch.fx.Node]:
    """``nodes`` and every node they depend on."""
    found: set[torch.fx.Node] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node not in found:
            found.add(node)
            stack.extend(node.all_input_nodes)
    return found


def run_in_block_order(
    gm: torch.fx.GraphModule,
    batches: Sequence[Mapping[str, Any]],
    wanted: Iterable[torch.fx.Node] | None = None,
    step_context: Callable[[torch.Tensor | None], ContextManager[Any]] | None = None,
    after_segment: Callable[[Sequence[torch.fx.Node]], None] | None = None,
    before_node: Callable[[torch.fx.Node, Sequence[Lockstep]], None] | None = None,
    on_value: Callable[[torch.fx.Node, int, Any], None] | None = None,
    after_node: Callable[[torch.fx.Node, Sequence[Lockstep]], None] | None = None,
) -> BlockOrderRun:
    """Run every batch (keyword inputs) through the nodes ``gm`` needs to compute ``wanted``
    (``None``: the graph's outputs, which are returned), loading each load unit (a block's
    tensors; a tensor read outside blocks) just in time and releasing it after. The batches go
    through one block (or the nodes between two blocks) one after the other, so inside a block
    one batch's values live at a time. ``step_context(mask)``, with the batch's boolean ``attention_mask``, is
    entered while a batch runs (observers read the real tokens from it). ``after_segment(nodes)``
    is called once every batch has run a segment's nodes and the load units ending there are
    released: per-block work on what the segment recorded (GPTQ rounds a block's Linears as soon
    as their Gram matrices are complete, holding one block's at a time). With ``before_node(node,
    runs)``, called before each node runs with every batch's run, a segment runs node by node over
    all batches instead (every batch's values inside the block live at once), so the caller can
    change a value between nodes (sequential GPTQ gives a Linear its rounded weight);
    ``after_node(node, runs)`` likewise after it ran on every batch (it needs ``before_node``).
    ``on_value(node, i, value)`` is called as each node of ``wanted`` runs on batch ``i``: each
    node sees the batches in order, block by block (:func:`probe_batches`)."""
    source: WeightSource = gm.meta[meta.GM_WEIGHT_SOURCE]
    wanted = None if wanted is None else list(wanted)
    output = gm.graph.output_node()
    needed = ancestors_of([output] if wanted is None else wanted)
    stored = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target in source.tensors]
    stored_set = set(stored)
    nodes = [n for n in gm.graph.nodes if n in needed and n.op not in ("placeholder", "output") and n not in stored_set]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    spans = _block_spans(gm, order)
    units = _load_schedule(source, nodes, order, spans)
    starting: dict[torch.fx.Node, list[LoadUnit]] = {}
    ending: dict[torch.fx.Node, list[LoadUnit]] = {}
    for unit in units:
        starting.setdefault(unit.first, []).append(unit)
        ending.setdefault(unit.last, []).append(unit)
    attr_nodes: dict[str, list[torch.fx.Node]] = {}
    for node in stored:
        attr_nodes.setdefault(str(node.target), []).append(node)
    # the output node reads the values it returns last: they are kept to the end, never freed
    last_uses = _last_uses(nodes + ([output] if wanted is None else []))
    runs = [Lockstep(gm, batch, last_uses) for batch in batches]
    context = step_context or (lambda mask: contextlib.nullcontext())
    if after_node is not None and before_node is None:
        raise ValueError("after_node runs node by node over all batches: give before_node too")
    watched = set(wanted or ()) if on_value is not None else set()

    def watch(node: torch.fx.Node, i: int, value: Any) -> None:
        if node in watched:
            on_value(node, i, value)

    with torch.no_grad():
        for segment in _segments(nodes, order, spans):
            for unit in (u for node in segment for u in starting.get(node, ())):
                materialize(gm, unit.targets)
                for target in unit.targets:
                    for attr in attr_nodes[target]:
                        if attr in needed:
                            for run in runs:
                                run.env[attr] = fetch_attr(gm, target)
            # batch by batch through the segment: only one batch's values inside a block live at
            # a time, the others' boundary values wait; each observer still sees batch 0, 1, ...
            if before_node is None:
                for i, run in enumerate(runs):
                    with context(run.mask):
                        for node in segment:
                            watch(node, i, run.step(node))
            else:
                for node in segment:
                    before_node(node, runs)
                    for i, run in enumerate(runs):
                        with context(run.mask):
                            watch(node, i, run.step(node))
                    if after_node is not None:
                        after_node(node, runs)
            for unit in (u for node in segment for u in ending.get(node, ())):
                release(gm, unit.targets)
            if after_segment is not None:
                after_segment(segment)
            # the block's weights and activations were freed between live tensors of a few MB,
            # which glibc keeps in its heap: without this SmolLM2's RSS grew 14 MB per block
            return_freed_memory()
    outputs = tuple(gm.graph.process_outputs(run.run_node(output)) for run in runs) if wanted is None else None
    return BlockOrderRun(tuple(units), outputs)


def probe_batches(gm: torch.fx.GraphModule, nodes: Iterable[torch.fx.Node], batches: Sequence[Mapping[str, Any]],
                  callback: Callable[[torch.fx.Node, int, Any], None],
                  step_context: Callable[[torch.Tensor | None], ContextManager[Any]] | None = None) -> None:
    """``callback(node, i, value)`` for each of ``nodes`` on each batch ``i`` (keyword inputs),
    under ``step_context(attention mask)``. A graph holding its weights runs batch after batch
    (:func:`~.probe.probe`); one captured without weights runs in block order, each block's
    weights loaded only while it runs, so each node sees the same batches in the same order but
    the nodes take turns block by block: for callbacks that keep one statistic per node."""
    nodes = list(nodes)
    context = step_context or (lambda mask: contextlib.nullcontext())
    if gm.meta.get(meta.GM_WEIGHT_SOURCE) is not None:
        run_in_block_order(gm, batches, nodes, context, on_value=callback)
        return
    for i, batch in enumerate(batches):
        with context(batch.get("attention_mask")):
            probe(gm, nodes, ((), dict(batch)), lambda node, value, i=i: callback(node, i, value))
