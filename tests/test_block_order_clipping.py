"""Token-wise clipping on a graph captured without weights (issue 28, ``--low-memory``): each
search step's candidates are evaluated together, segment by segment, so each block's weights are
loaded once per step whatever the number of candidates, and the choices equal the loaded
search's bit for bit."""

from __future__ import annotations

import collections
import dataclasses

import pytest

import outlierfx
import outlierfx.graph.weight_source as weight_source
from outlierfx.graph.weight_source import capture_without_weights
from outlierfx.passes import Calibrate, InsertObservers
from outlierfx.passes.clip_tokenwise import ClipTokenwise
from outlierfx.quantizers.policy import make_policy
from outlierfx.testing import build_model

SHAPES = ((1, 8, 2), (2, 5, 3))  # (seed, seq, batch)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """A generated BERT's calibrated graph (W8A6: clipping pays), with its weights and without."""
    folder = tmp_path_factory.mktemp("bert")
    g = build_model("bert", seed=1)
    g.model.save_pretrained(folder)
    batches = [build_model("bert", seed=seed, seq=seq, batch=batch).inputs for seed, seq, batch in SHAPES]
    policy = make_policy("full", "W8A6")

    def calibrated(gm):
        return Calibrate(batches)(InsertObservers(policy)(gm).graph_module).graph_module

    return calibrated(outlierfx.capture(g.model, g.inputs)), calibrated(capture_without_weights(folder, g.inputs)), \
        batches


@pytest.mark.parametrize("steps", [10, 20])
def test_the_search_equals_the_loaded_one_and_loads_each_block_once_a_step(graphs, monkeypatch, steps):
    loaded, weight_free, batches = graphs
    loads: collections.Counter[str] = collections.Counter()
    set_all = weight_source._set_all

    def counting(gm, targets, value):
        loads.update(targets)
        return set_all(gm, targets, value)

    monkeypatch.setattr(weight_source, "_set_all", counting)
    clip = ClipTokenwise(batches, steps=steps)
    expected, got = clip(loaded), clip(weight_free)
    assert got.modified and any(a < 1.0 for a in got.plan.alphas.values())
    assert dataclasses.replace(got.plan, search_seconds=0) == dataclasses.replace(expected.plan, search_seconds=0)
    assert got.plan.evaluations == 1 + (steps + 1) + 2 * steps  # unclipped, the grid, then each block's others
    # the reference forward, the global step, one step per block (2 layers): steps + 1 candidates each
    assert {loads[f"encoder.layer.{i}.output.dense.weight"] for i in range(2)} == {1 + 1 + 2}
