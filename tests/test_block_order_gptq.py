"""GPTQ on a graph captured without weights (issue 28): its Gram matrices come from a forward in
block order, each block's Linears are rounded once every batch has gone through the block, and
the rounded weights are held as int8 codes. After ConvertToFakeQuant the graph is the loaded
run's GPTQ + conversion bit for bit, and no more than one block's float weights (and Gram
matrices) are in memory while it rounds. Sequential GPTQ runs each block node by node over all
batches and rounds each Linear as its input arrives, as the loaded run does."""

from __future__ import annotations

import pytest
import torch

import outlierfx
import outlierfx.passes.gptq as gptq_module
from outlierfx.graph import meta
from outlierfx.graph.copy import copy_graph_module
from outlierfx.graph.weight_source import StoredTensor, capture_without_weights, materialize
from outlierfx.passes import Calibrate, ConvertToFakeQuant, InsertObservers
from outlierfx.errors import PassError
from outlierfx.passes.gptq import GPTQ
from outlierfx.quantizers.integer_codes import HeldCodes
from outlierfx.quantizers.observers import FakeQuantize, Observer
from outlierfx.quantizers.policy import make_policy
from outlierfx.quantizers.spec import Estimator
from outlierfx.testing import saved_llama

LAYERS = 3
COMPUTED = {"model.rotary_emb.inv_freq"}  # computed at capture, not loaded: real throughout


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """The tied GQA Llama's calibrated graph, captured with its weights and without, and batches of three shapes."""
    folder = tmp_path_factory.mktemp("llama")
    g, batches = saved_llama(folder, LAYERS, ((1, 8, 2), (2, 5, 3), (3, 11, 1)))

    def calibrated(gm):
        return Calibrate(batches)(InsertObservers("full")(gm).graph_module).graph_module

    return calibrated(outlierfx.capture(g.model, g.inputs)), calibrated(capture_without_weights(folder, g.inputs)), \
        batches


def _tensors(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    return dict([*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)])


def _real(gm: torch.fx.GraphModule) -> set[str]:
    """The graph's tensors with storage, but the quantizers' own (scales, zero points) and the computed buffer."""
    quantizers = {name for name, m in gm.named_children() if isinstance(m, (Observer, FakeQuantize))}
    return {name for name, t in _tensors(gm).items()
            if t.device.type != "meta" and name.split(".")[0] not in quantizers} - COMPUTED


def _block(target: str) -> str | None:
    return ".".join(target.split(".")[:3]) if target.startswith("model.layers.") else None


@pytest.mark.parametrize("bits,sequential", [("W8A8", False), ("W4A8", False), ("W4A8", True)])
def test_gptq_in_block_order_equals_the_loaded_runs_gptq_and_conversion(graphs, bits, sequential):
    loaded, weight_free, batches = graphs
    policy = make_policy("full", bits)
    # at W4A8 the preset's weight rows: MSE-clipped, asymmetric (presets._low_bit_weights)
    spec = policy.weight if bits == "W8A8" else policy.weight.with_(estimator=Estimator.MSE, symmetric=False)
    gptq = GPTQ(batches, spec, policy.embedding, sequential=sequential)
    convert = ConvertToFakeQuant(spec, policy.embedding)
    expected, got = gptq(loaded), gptq(weight_free)
    assert got.modified and len(got.plan.linears) == 7 * LAYERS  # the tied LM head is left alone
    assert got.plan.linears == expected.plan.linears  # the same Grams, token counts and errors, exactly
    assert got.plan.skipped == expected.plan.skipped and not got.plan.weights
    # the pass worked on its copy; the copy holds the rounded weights as int8 codes, nothing real
    assert all(isinstance(e, StoredTensor) for e in weight_free.meta[meta.GM_WEIGHT_SOURCE].tensors.values())
    source = got.graph_module.meta[meta.GM_WEIGHT_SOURCE].tensors
    assert sum(isinstance(e, HeldCodes) for e in source.values()) == 7 * LAYERS
    assert _real(got.graph_module) == set()

    full, light = convert(expected.graph_module).graph_module, convert(got.graph_module).graph_module
    assert [n.name for n in light.graph.nodes] == [n.name for n in full.graph.nodes]
    materialize(light, light.meta[meta.GM_WEIGHT_SOURCE].tensors)
    want, have = _tensors(full), _tensors(light)
    assert have.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(tensor, have[name]), name
    with torch.no_grad():
        for batch in batches:
            assert torch.equal(light(**batch).logits, full(**batch).logits)


def _real_at_each_rounding(weight_free, batches, monkeypatch, sequential: bool
                           ) -> list[tuple[set[str], set[str], int]]:
    """GPTQ on a copy of ``weight_free``; at each Linear's rounding: the real tensors of the pass's
    graph, those of its work graph (the block-order forward) and how many Gram matrices it holds."""
    policy = make_policy("full")
    gptq = GPTQ(batches, policy.weight, policy.embedding, sequential=sequential)
    work_graphs: list[torch.fx.GraphModule] = []
    make_work_graph = GPTQ._work_graph

    def keeping(self, gm):
        work_graphs.append(make_work_graph(self, gm))
        return work_graphs[-1]

    seen: list[tuple[set[str], set[str], int]] = []
    rounding = gptq_module.gptq_round

    def recording(weight, gram, spec, *args, **kwargs):
        (work,) = work_graphs
        grams = sum(getattr(m, "gram", None) is not None for name, m in work.named_children()
                    if name.startswith("outlierfx_gptq_recorder_"))
        seen.append((_real(rounded_graph), _real(work), grams))
        return rounding(weight, gram, spec, *args, **kwargs)

    monkeypatch.setattr(GPTQ, "_work_graph", keeping)
    monkeypatch.setattr(gptq_module, "gptq_round", recording)
    rounded_graph = copy_graph_module(weight_free)
    gptq.apply(rounded_graph, gptq.analyze(rounded_graph))
    assert _real(rounded_graph) == set()
    assert len(seen) == 7 * LAYERS
    return seen


def test_one_block_of_float_weights_and_grams_at_a_time(graphs, monkeypatch):
    _, weight_free, batches = graphs
    seen = _real_at_each_rounding(weight_free, batches, monkeypatch, sequential=False)
    blocks = [{_block(t) for t in pass_real} for pass_real, _, _ in seen]
    assert all(len(now) == 1 and None not in now for now in blocks)  # one block's weights, the one it rounds
    assert [b for now in blocks for b in now] == [f"model.layers.{i}" for i in range(LAYERS) for _ in range(7)]
    assert max(len(pass_real) for pass_real, _, _ in seen) == 7  # the block's Linear weights, no rounded copies
    assert all(not work_real for _, work_real, _ in seen)  # the forward's block weights were released before
    assert max(grams for _, _, grams in seen) == 7  # one block's Gram matrices held, no more


def test_sequential_gptq_loads_the_linear_it_rounds_and_the_forwards_block(graphs, monkeypatch):
    _, weight_free, batches = graphs
    seen = _real_at_each_rounding(weight_free, batches, monkeypatch, sequential=True)
    assert all(len(pass_real) == 1 for pass_real, _, _ in seen)  # the Linear it rounds, nothing else
    rounded = [_block(next(iter(pass_real))) for pass_real, _, _ in seen]
    assert rounded == [f"model.layers.{i}" for i in range(LAYERS) for _ in range(7)]
    # the forward holds the block it runs (the Linears' weights, its norms' gains), nothing else
    assert all(work_real and {_block(t) for t in work_real} == {block}
               for (_, work_real, _), block in zip(seen, rounded))


def test_a_rounded_grid_without_int8_codes_is_refused_by_name(graphs):
    """8-bit asymmetric rows have no int8 codes (257 levels with the zero point's offset): the
    weight-free graph could hold them only as float, so GPTQ refuses, naming the weight."""
    _, weight_free, batches = graphs
    asymmetric = make_policy("full").weight.with_(symmetric=False)
    with pytest.raises(PassError, match=r"model\.layers\.0\..*rounded by GPTQ.* no int8 codes"):
        GPTQ(batches, asymmetric)(weight_free)
