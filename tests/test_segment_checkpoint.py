"""LearnRanges on a graph captured without weights (issue 28, ``--low-memory``): every training
forward runs segment by segment under activation checkpointing, each segment loading its weights
when it runs and when the backward recomputes it (``graph.segment_checkpoint``). The autograd
graph is the whole-graph run's, so every step's loss and ranges equal the loaded run's bit for
bit, and no block's weights outlive its segment, in the forward or the backward."""

from __future__ import annotations

import weakref

import pytest
import torch

import outlierfx
import outlierfx.graph.weight_source as weight_source
import outlierfx.passes.learn_ranges as learn_ranges
from outlierfx.graph.segment_checkpoint import differentiable_forward
from outlierfx.graph.weight_source import capture_without_weights
from outlierfx.passes import Calibrate, ConvertToFakeQuant, InsertObservers
from outlierfx.passes.learn_ranges import LearnRanges
from outlierfx.quantizers.observers import Observer
from outlierfx.quantizers.policy import make_policy
from outlierfx.quantizers.trainable import LearnableRange
from outlierfx.testing import saved_llama

LAYERS = 3
POLICY = make_policy("full", "W8A4")  # 4-bit activations: the ranges have something to learn


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """The tied GQA Llama's calibrated graph, captured with its weights and without, and its batches."""
    folder = tmp_path_factory.mktemp("llama")
    g, batches = saved_llama(folder, LAYERS, ((1, 8, 2), (2, 5, 3)))

    def calibrated(gm):
        return Calibrate(batches)(InsertObservers(POLICY)(gm).graph_module).graph_module

    return calibrated(outlierfx.capture(g.model, g.inputs)), calibrated(capture_without_weights(folder, g.inputs)), \
        batches


def test_every_step_equals_the_loaded_runs(graphs, monkeypatch):
    loaded, weight_free, batches = graphs
    taken = learn_ranges.step
    steps: list[list[tuple[float, list[torch.Tensor]]]] = []

    def recording(params, *args):
        loss = taken(params, *args)
        steps[-1].append((loss, [p.detach().clone() for p in params]))
        return loss

    monkeypatch.setattr(learn_ranges, "step", recording)
    learn = LearnRanges(batches, POLICY.weight, POLICY.embedding, steps=8, lr=5e-2, check_every=2)
    results = []
    for gm in (loaded, weight_free):
        steps.append([])
        results.append(learn(gm))
    want, got = steps
    assert len(got) == len(want) == 8
    assert max(float((a - b).abs().max()) for a, b in zip(got[-1][1], got[0][1])) > 0  # the ranges moved
    for (loss, params), (want_loss, want_params) in zip(got, want):
        assert loss == want_loss and all(torch.equal(a, b) for a, b in zip(params, want_params))
    expected, result = results
    assert (result.plan.best_step, result.plan.loss_start, result.plan.loss_end) == \
        (expected.plan.best_step, expected.plan.loss_start, expected.plan.loss_end)


def _block(target: str) -> str:
    return ".".join(target.split(".")[:3]) if target.startswith("model.layers.") else "outside"


def test_no_block_outlives_its_segment_forward_or_backward(graphs, monkeypatch):
    """Each tensor loaded (in the forward, and again when the backward recomputes its segment)
    finds no other block's tensors alive: not in the graph, not saved for the backward."""
    _, weight_free, batches = graphs
    work = ConvertToFakeQuant(POLICY.weight, POLICY.embedding)(weight_free).graph_module
    for name, module in weight_free.named_children():
        if isinstance(module, Observer):
            setattr(work, name, LearnableRange(module))
    loaded: list[tuple[str, weakref.ref]] = []
    seen: list[tuple[str, set[str]]] = []
    set_all = weight_source._set_all

    def recording(gm, targets, value):
        alive = {_block(t) for t, ref in loaded if ref() is not None}
        seen.append((_block(targets[0]), alive))
        loaded.append((targets[0], weakref.ref(value)))
        return set_all(gm, targets, value)

    monkeypatch.setattr(weight_source, "_set_all", recording)
    loss = differentiable_forward(work, batches[0]).logits.pow(2).mean()
    forward = len(seen)
    loss.backward()
    blocks = [f"model.layers.{i}" for i in range(LAYERS)]
    order = [block for block, _ in seen if block != "outside"]
    # the forward loads blocks 0, 1, 2 (two norms, seven Linears each), the backward 2, 1, 0
    assert order == [b for b in blocks for _ in range(9)] + [b for b in reversed(blocks) for _ in range(9)]
    assert forward == len(seen) // 2
    assert all(alive <= {block} for block, alive in seen)
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in work.parameters())
