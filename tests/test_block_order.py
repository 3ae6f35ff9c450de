"""Block-order runs of a graph captured without weights (issue 28): the observers end with
exactly the statistics a whole-graph calibration of the loaded model gives them, while no more
than one block's weights (and the tensors read outside blocks) are in memory at a time; a
forward in block order (also of the generating graph with its KV cache) gives the normal
graph's outputs exactly."""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree

import outlierfx
from outlierfx.graph import OpKind, meta, op_kind
from outlierfx.graph.attrs import fetch_attr
from outlierfx.graph.block_order import run_in_block_order
from outlierfx.graph.kv_cache import CachedDecoder, prefill_inputs
from outlierfx.graph.weight_source import capture_without_weights
from outlierfx.passes import Calibrate, InsertObservers
from outlierfx.passes.insert_observers import observers
from outlierfx.quantizers.calibrate import calibrate
from outlierfx.testing import saved_llama

LAYERS = 3


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    g, batches = saved_llama(folder, LAYERS, ((1, 8, 2), (2, 5, 3), (3, 11, 1)))
    return g, folder, batches


def _stored_on_cpu(gm: torch.fx.GraphModule) -> set[str]:
    return {t for t in gm.meta[meta.GM_WEIGHT_SOURCE].tensors if fetch_attr(gm, t).device.type != "meta"}


def test_block_order_calibration_equals_whole_graph_calibration(saved):
    g, folder, batches = saved
    full = InsertObservers("full")(outlierfx.capture(g.model, g.inputs)).graph_module
    calibrate(full, batches, progress=False)
    light = InsertObservers("full")(capture_without_weights(folder, g.inputs)).graph_module
    light = Calibrate(batches)(light).graph_module  # the pass a recipe runs: calibrate() on its copy

    expected, got = observers(full), observers(light)
    assert set(got) == set(expected) and len(got) > 10 * LAYERS
    for name, observer in expected.items():
        state, other = observer.state_dict(), got[name].state_dict()
        assert state.keys() == other.keys()
        for key, value in state.items():
            assert torch.equal(value, other[key]), (name, key)
    assert not _stored_on_cpu(light)  # every weight released again


def test_one_block_of_weights_at_a_time(saved):
    g, folder, batches = saved
    gm = InsertObservers("full")(capture_without_weights(folder, g.inputs)).graph_module
    held: list[set[str]] = []

    def record(mask):
        held.append(_stored_on_cpu(gm))
        return torch.no_grad()

    wanted = [n for n in gm.graph.nodes if n.target in observers(gm)]
    units = run_in_block_order(gm, batches, wanted, record).units
    blocks = [u for u in units if u.name.startswith("model.layers.")]
    assert [u.name for u in blocks] == [f"model.layers.{i}" for i in range(LAYERS)]
    assert all(len(u.targets) == 9 for u in blocks)  # q, k, v, o, gate, up, down, two norms
    block_of = {t: u.name for u in blocks for t in u.targets}
    assert max(len({block_of[t] for t in now if t in block_of}) for now in held) == 1
    # outside blocks: the embedding table (the tied LM head's key: the head itself does not run)
    # only while the embedding runs, the final norm's gain only at the final norm
    assert {t for now in held for t in now if t not in block_of} == {"lm_head.weight", "model.norm.weight"}
    assert not _stored_on_cpu(gm)


def test_a_block_order_forward_computes_the_normal_graphs_outputs(saved):
    g, folder, batches = saved
    reference = outlierfx.capture(g.model, g.inputs)
    gm = capture_without_weights(folder, g.inputs)
    run = run_in_block_order(gm, batches)
    # the LM head runs now: the tied table stays loaded from the embedding to the head
    table = run.units[0]
    assert table.name == "lm_head.weight"
    assert (op_kind(table.first), op_kind(table.last)) == (OpKind.EMBEDDING, OpKind.LINEAR)
    assert len(run.outputs) == len(batches)
    with torch.no_grad():
        for batch, output in zip(batches, run.outputs):
            assert torch.equal(output.logits, reference(**batch).logits)
    assert not _stored_on_cpu(gm)


def test_the_generating_graph_with_its_kv_cache_runs_in_block_order(saved):
    g, folder, batches = saved
    prompts = [prefill_inputs(g.config, batch) for batch in batches]
    reference = outlierfx.capture(CachedDecoder(g.model), prompts[0])
    gm = capture_without_weights(folder, prompts[0], wrap=CachedDecoder)
    assert gm.meta[meta.GM_WEIGHT_SOURCE].tensors["model.lm_head.weight"].key == "model.embed_tokens.weight"
    run = run_in_block_order(gm, prompts)
    assert [u.name for u in run.units if ".layers." in u.name] == [f"model.model.layers.{i}" for i in range(LAYERS)]
    with torch.no_grad():
        for batch, output in zip(prompts, run.outputs):
            expected = pytree.tree_leaves(reference(**batch))  # logits, then every layer's keys and values
            assert len(pytree.tree_leaves(output)) == len(expected) == 1 + 2 * LAYERS
            assert all(torch.equal(a, b) for a, b in zip(pytree.tree_leaves(output), expected))
    assert not _stored_on_cpu(gm)
