"""GPTQ on a graph captured without weights (issue 28; docs/experiments/memory.md, "Block-wise
calibration"): the rounding is :mod:`~outlierfx.passes.gptq`'s, only where the Gram matrices
come from and where the rounded weights go differ.

The Gram matrices come from the same fake-quant work graph with float weights, run in block
order (:func:`~outlierfx.graph.block_order.run_in_block_order`: each block's weights loaded
around its segment) up to the recorders before the Linears. Once every batch has gone through
a block, its Grams are complete: its Linears' float weights are loaded, rounded, held as int8
codes by the weight source (:func:`~outlierfx.graph.weight_source.hold`, in the pass's
``apply``) and released, and the Grams dropped, so one block's float weights and Grams are in
memory at a time. The codes rebuild the rounded weight bit for bit, which ConvertToFakeQuant's
weight-free path then loads and puts on the same grid as the loaded run's conversion.

Sequential GPTQ (each Linear's inputs from the model whose earlier Linears are rounded) runs the
loaded path's per-node step (:func:`~outlierfx.passes.gptq.rounding_in_lockstep`) in block
order: each block's segment runs node by node over all batches (every batch's values inside the
block live at once, as they do in the loaded run), and each Linear's float weight is loaded in
the pass's graph only while it is rounded, beside the block the forward holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.fx

from .. import distributed
from ..graph import meta
from ..graph.block_order import run_in_block_order
from ..graph.weight_source import materialized
from ..quantizers.integer_codes import HeldCodes, codes_required, integer_weight
from ..quantizers.observers import observation_paused
from ..quantizers.spec import QuantSpec
from .convert_fake_quant import linear_weight_spec
from . import first_row_correction
from .gptq import GramRecorder, RoundOne, record_grams, rounding_in_lockstep, with_weights
from .training import Batch


def round_in_block_order(gm: torch.fx.GraphModule, targets: Sequence[torch.fx.Node], work: torch.fx.GraphModule,
                         batches: Sequence[Batch], weight_spec: QuantSpec, round_one: RoundOne,
                         sequential: bool = False) -> dict[str, HeldCodes]:
    """Linear node name -> its GPTQ-rounded weight as int8 codes, for ``targets`` (Linears of
    ``gm``, a graph captured without weights); ``work`` is GPTQ's fake-quant work graph of
    ``gm`` and ``round_one`` its rounding of one Linear, whose weight it reads from ``gm``.
    ``sequential``: each Linear rounded as its input arrives from the earlier Linears' rounded
    weights (:func:`_round_sequentially`)."""
    if sequential:
        return _round_sequentially(gm, targets, work, batches, weight_spec, round_one)
    recorders = record_grams(work, targets)
    linear_of = {recorder_node: name for name, (recorder_node, _) in recorders.items()}
    original = {node.name: node for node in targets}
    held: dict[str, HeldCodes] = {}

    def round_segment(segment: Sequence[torch.fx.Node]) -> None:
        names = [linear_of[node] for node in segment if node in linear_of]
        if not names:
            return
        distributed.reduce_statistics([recorders[name][1] for name in names])
        nodes = [original[name] for name in names]
        with materialized(gm, [str(node.args[1].target) for node in nodes]):
            for node in nodes:
                recorder = recorders[node.name][1]
                rounded = round_one(node, *recorder.result())
                recorder.gram = None  # this block's Grams are spent
                if rounded is not None:
                    held[node.name] = _codes(node, rounded, linear_weight_spec(node, weight_spec))

    everyone = [recorder for _, recorder in recorders.values()]
    with torch.no_grad(), observation_paused(), distributed.failing_together("collecting GPTQ's Gram matrices"):
        run_in_block_order(work, distributed.shard(batches), list(linear_of),
                           lambda mask: _masking(everyone, mask), round_segment)
    return held


@contextlib.contextmanager
def _masking(recorders: Sequence[GramRecorder], mask: torch.Tensor | None) -> Iterator[None]:
    """The recorders count the real tokens of the batch that runs (``mask``: its attention mask)."""
    for recorder in recorders:
        recorder.mask = mask
    yield


def _codes(node: torch.fx.Node, rounded: torch.Tensor, spec: QuantSpec) -> HeldCodes:
    """The int8 codes and per-row scales that rebuild ``rounded`` (on ``spec``'s grid) bit for bit."""
    codes = integer_weight(rounded, spec)
    if codes is None:
        raise codes_required(f"{meta.module_path(node) or node.name}'s weight, rounded by GPTQ,", rounded, spec)
    return codes


def correct_first_rows_in_block_order(gm: torch.fx.GraphModule, targets: Sequence[torch.fx.Node],
                                      work: torch.fx.GraphModule, batches: Sequence[Batch],
                                      held: dict[str, HeldCodes]) -> dict[str, torch.Tensor]:
    """GPTQ's first-row corrections (:mod:`~.first_row_correction`) on a graph captured without
    weights: ``work`` runs in block order, node by node over all batches, each rounded Linear
    reading its weight from its codes in ``held``; the float weight of ``gm`` it is measured
    against is loaded only while its correction is measured."""
    by_name = {node.name: node for node in work.graph.nodes}
    after, corrections = first_row_correction.measure_in_lockstep(
        work, gm, targets, held.__contains__, lambda tensors: materialized(gm, tensors))
    with torch.no_grad(), observation_paused(), distributed.failing_together("measuring first-row corrections"):
        # each Linear's readers too: a value nothing reads is freed as soon as it is made, and the
        # hook reads each Linear's output after it ran (the last block's, where the LM head is tied)
        linears = [by_name[node.name] for node in targets]
        run_in_block_order(work, distributed.shard(batches), [*linears, *(u for n in linears for u in n.users)],
                           before_node=with_weights(lambda name: held[name].weight() if name in held else None),
                           after_node=after)
    return corrections


def _round_sequentially(gm: torch.fx.GraphModule, targets: Sequence[torch.fx.Node], work: torch.fx.GraphModule,
                        batches: Sequence[Batch], weight_spec: QuantSpec, round_one: RoundOne
                        ) -> dict[str, HeldCodes]:
    """Sequential GPTQ in block order: the loaded path's step (:func:`~.gptq.rounding_in_lockstep`)
    before each node, each block's segment run node by node over all batches; each Linear's float
    weight is loaded in ``gm`` only while it is rounded (the work graph holds its block's)."""
    held: dict[str, HeldCodes] = {}

    def round_and_hold(node: torch.fx.Node, gram: torch.Tensor, tokens: int) -> torch.Tensor | None:
        with materialized(gm, [str(node.args[1].target)]):
            rounded = round_one(node, gram, tokens)
        if rounded is not None:
            held[node.name] = _codes(node, rounded, linear_weight_spec(node, weight_spec))
        return rounded

    by_name = {node.name: node for node in work.graph.nodes}
    with torch.no_grad(), observation_paused(), distributed.failing_together("rounding with sequential GPTQ"):
        run_in_block_order(work, distributed.shard(batches), [by_name[node.name] for node in targets],
                           before_node=rounding_in_lockstep(work, targets, round_and_hold))
    return held
