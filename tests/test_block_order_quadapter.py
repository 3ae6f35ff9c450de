"""Quadapter on a graph captured without weights (issue 28, ``--low-memory``): InsertQuadapter
works on the graph's structure, TrainQuadapter trains each block's scales with only that
segment's weights loaded (its SmoothQuant init and site ranges collected in block order), and
FoldQuadapter records the folded weights as derived tensors. The trained scales, the refreshed
ranges and every folded tensor equal the loaded run's bit for bit: the same values go through the
same ops in the same order, only where the weights come from differs."""

from __future__ import annotations

import pytest
import torch

import outlierfx
from outlierfx.errors import PassError
from outlierfx.graph import meta
from outlierfx.graph.derived_tensors import DerivedTensor
from outlierfx.graph.weight_source import StoredTensor, capture_without_weights, materialize
from outlierfx.passes import Calibrate, InsertObservers
from outlierfx.passes.fold_quadapter import FoldQuadapter
from outlierfx.passes.quadapter import InsertQuadapter
from outlierfx.passes.train_quadapter import TrainQuadapter
from outlierfx.testing import build_model

SHAPES = ((1, 8, 2), (2, 5, 3))  # (seed, seq, batch)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """A generated BERT's graph with Quadapter scales at every foldable Linear input (the
    encoder preset's sites), captured with its weights and without, and its batches."""
    folder = tmp_path_factory.mktemp("bert")
    g = build_model("bert", seed=1)
    g.model.save_pretrained(folder)
    batches = [build_model("bert", seed=seed, seq=seq, batch=batch).inputs for seed, seq, batch in SHAPES]

    def with_scales(gm):
        calibrated = Calibrate(batches)(InsertObservers("linear-inputs")(gm).graph_module).graph_module
        inserted = InsertQuadapter(explicit=True, foldable_only=True)(calibrated)
        assert inserted.modified
        return inserted.graph_module

    return with_scales(outlierfx.capture(g.model, g.inputs)), with_scales(capture_without_weights(folder, g.inputs)), \
        batches


def _tensors(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict([*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)])


def _real_weights(gm: torch.fx.GraphModule) -> set[str]:
    """The graph's weight-source tensors that hold storage now."""
    source = gm.meta[meta.GM_WEIGHT_SOURCE].tensors
    return {name for name, t in _tensors(gm).items() if name in source and t.device.type != "meta"}


def _train(batches) -> TrainQuadapter:
    return TrainQuadapter(batches, init="smoothquant", alpha=0.8, max_steps=12, check_every=2, progress=False)


def test_training_in_block_order_gives_the_loaded_runs_scales_and_ranges(graphs, monkeypatch):
    loaded, weight_free, batches = graphs
    seen: list[tuple[int, set[str]]] = []
    train_block = TrainQuadapter._train_block

    def recording(self, index, targets_of, scales, student, *args):
        if meta.GM_WEIGHT_SOURCE in student.gm.meta:
            seen.append((index, _real_weights(student.gm)))
        return train_block(self, index, targets_of, scales, student, *args)

    monkeypatch.setattr(TrainQuadapter, "_train_block", recording)
    expected, got = _train(batches)(loaded), _train(batches)(weight_free)
    assert got.modified and got.plan.parameters == expected.plan.parameters > 0
    assert got.plan.blocks == expected.plan.blocks  # the same losses, steps and plateaus, exactly
    assert sum(b.steps for b in got.plan.blocks) > 0
    assert got.plan.log_scales.keys() == expected.plan.log_scales.keys()
    for target, log_s in expected.plan.log_scales.items():
        assert torch.equal(got.plan.log_scales[target], log_s), target
        assert log_s.abs().max() > 0  # the SmoothQuant init moved them off identity
    for name, observer in expected.plan.observers.items():
        assert all(torch.equal(a, b) for a, b in zip(got.plan.observers[name].buffers(), observer.buffers())), name
    # each block trained with its own segment's weights loaded: block 0's segment starts at the
    # embeddings, block 1's after block 0's last residual add, at the post-LN norm that ends
    # block 0; nothing else, and nothing left loaded after the pass
    assert [index for index, _ in seen] == [0, 1]
    first, second = (real for _, real in seen)
    assert {t for t in first if not t.startswith("encoder.layer.0.")} == {
        f"embeddings.{name}" for name in ("word_embeddings.weight", "position_embeddings.weight",
                                          "token_type_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias")}
    assert {t for t in second if not t.startswith("encoder.layer.1.")} == {
        "encoder.layer.0.output.LayerNorm.weight", "encoder.layer.0.output.LayerNorm.bias"}
    assert len([t for t in second if t.startswith("encoder.layer.1.")]) == 14  # 6 Linears' weights and biases, a norm
    assert not _real_weights(got.graph_module) and not _real_weights(weight_free)


def test_folding_records_derived_tensors_equal_to_the_loaded_fold(graphs):
    loaded, weight_free, batches = graphs
    train = _train(batches)
    expected = FoldQuadapter()(train(loaded).graph_module)
    got = FoldQuadapter()(train(weight_free).graph_module)
    assert got.modified and got.plan == expected.plan
    assert got.plan.folded and got.plan.into_rows  # norms' gamma/beta and the value projections' rows
    source = got.graph_module.meta[meta.GM_WEIGHT_SOURCE].tensors
    derived = {t: e for t, e in source.items() if isinstance(e, DerivedTensor)}
    assert {e.description for e in derived.values()} >= {"FoldQuadapter: gamma s", "FoldQuadapter: beta s",
                                                          "FoldQuadapter: W (1/s) on the input columns",
                                                          "s on the output rows: diag(s) W"}
    # a value projection's rows scaled after its columns took a norm's 1/s: a chain of two
    assert any(any(isinstance(i, DerivedTensor) for i in e.inputs) for e in derived.values())
    assert not _real_weights(got.graph_module)
    assert all(isinstance(e, StoredTensor) for e in weight_free.meta[meta.GM_WEIGHT_SOURCE].tensors.values())
    light = got.graph_module
    materialize(light, source)
    want, have = _tensors(expected.graph_module), _tensors(light)
    assert have.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(have[name], tensor), name


def test_phase_two_is_refused_on_a_graph_captured_without_weights(graphs):
    _, weight_free, batches = graphs
    with pytest.raises(PassError, match=r"phase 2 \(end_to_end_steps\).*low_memory=True"):
        TrainQuadapter(batches, end_to_end_steps=2, progress=False)(weight_free)
