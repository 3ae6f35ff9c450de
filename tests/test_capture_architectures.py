"""Regression tests for architectures whose capture failed (issue 25): tiny random-weight models
built from transformers' config classes (hidden 64, 2 layers, 4 heads), nothing downloaded."""

import pytest
import torch
from torch.fx.experimental.symbolic_shapes import is_concrete_int

import outlierfx
from outlierfx.errors import DataError
from outlierfx.graph import OpKind, count_ops, meta
from outlierfx.graph.ops import aten
from outlierfx.testing import assert_equivalent
from outlierfx.testing.architectures import build_architecture

TOL = 1e-5  # of the output's max magnitude


def _targets(gm):
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("architecture", ["mpnet", "deberta-v2"])
def test_contiguous_before_view_survives_canonicalization(architecture):
    """Both call ``permute(...).contiguous().view(...)``: dropping the copy broke the view."""
    g = build_architecture(architecture)
    gm = outlierfx.capture(g.model, g.inputs)
    assert gm.meta[meta.GM_CAPTURE_REPORT].notes == ()  # dynamic shapes, no fallback
    assert_equivalent(g.model, gm, build_architecture(architecture, batch=3, seq=11, seed=1).inputs, tol=TOL)


def test_bloom_alibi_scores_capture_with_dynamic_shapes():
    g = build_architecture("bloom")
    gm = outlierfx.capture(g.model, g.inputs)
    report = gm.meta[meta.GM_CAPTURE_REPORT]
    assert report.notes == () and report.rewrites["decompose_baddbmm"] == g.config.num_hidden_layers
    assert aten.baddbmm.default not in _targets(gm)
    assert count_ops(gm)[OpKind.SOFTMAX.value] == g.config.num_hidden_layers
    other = build_architecture("bloom", batch=3, seq=11, seed=1).inputs
    assert_equivalent(g.model, gm, other, tol=TOL)
    qmodel, _ = outlierfx.quantize(g.model, [g.inputs], recipe="naive", policy="linear-inputs", backend="onednn",
                                   generation=False, progress=False)
    assert qmodel(**other).logits.shape == (3, 11, g.config.vocab_size)


@pytest.mark.parametrize("head", ["causal-lm", "bare"])
def test_falcon_linears_written_as_matrix_products_are_recognised(head):
    """FalconLinear computes ``x @ W.T + b``; each must be one aten.linear (fused QKV, dense,
    and the parallel MLP's two), so observers find them also without the lm_head."""
    g = build_architecture("falcon", bias=True)
    model = g.model if head == "causal-lm" else g.model.transformer
    gm = outlierfx.capture(model, g.inputs)
    per_layer = 4  # query_key_value, dense, dense_h_to_4h, dense_4h_to_h
    expected = per_layer * g.config.num_hidden_layers + (head == "causal-lm")
    assert count_ops(gm)[OpKind.LINEAR.value] == expected
    linears = [n for n in gm.graph.nodes if n.target is aten.linear.default and len(n.args) == 3]
    assert len(linears) == per_layer * g.config.num_hidden_layers  # the biases are folded into the Linears
    qmodel, report = outlierfx.quantize(model, [g.inputs], recipe="naive", policy="linear-inputs", backend="onednn",
                                        generation=False, progress=False)
    assert len([p for p in report.placement.points if p.spec is not None]) >= 3 * g.config.num_hidden_layers
    qmodel(**g.inputs)


@torch.library.custom_op("outlierfx_test::needs_concrete_sizes", mutates_args=())
def needs_concrete_sizes(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@needs_concrete_sizes.register_fake
def _(x):
    # what torch 2.13's baddbmm shape function did with symbolic sizes
    if not all(is_concrete_int(size) for size in x.shape):
        raise RuntimeError("SymIntArrayRef expected to contain only concrete integers")
    return torch.empty_like(x)


class NeedsConcreteSizes(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.linear(needs_concrete_sizes(x))


def test_a_model_that_needs_concrete_sizes_falls_back_to_static_shapes_with_a_note():
    model, x = NeedsConcreteSizes(), torch.randn(2, 5, 8)
    gm = outlierfx.capture(model, (x,))
    (note,) = gm.meta[meta.GM_CAPTURE_REPORT].notes
    assert "static shapes" in note and "concrete integers" in note
    assert_equivalent(model, gm, (x,))
    with pytest.raises(DataError, match=r"captured with static shapes and takes only \(2, 5, 8\)"):
        gm(torch.randn(3, 5, 8))


def test_quantize_reports_the_static_shape_fallback_and_its_model_names_the_shapes():
    model = NeedsConcreteSizes()
    batch = {"x": torch.randn(2, 5, 8)}
    qmodel, report = outlierfx.quantize(model, [batch], recipe="naive", policy="linear-inputs", progress=False)
    assert any("static shapes" in note for note in report.notes)
    assert "note: captured with static shapes" in report.to_text() and report.as_dict()["notes"] == list(report.notes)
    with pytest.raises(DataError, match="takes only"):
        qmodel(x=torch.randn(2, 7, 8))


def test_a_graph_without_recognised_linears_does_not_blame_the_user():
    model = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.GELU())
    with pytest.raises(DataError, match="recognised no Linear layer") as info:
        outlierfx.quantize(model, [{"input": torch.randn(2, 8)}], recipe="naive", policy="linear-inputs",
                           progress=False)
    assert "run InsertObservers" not in str(info.value)
