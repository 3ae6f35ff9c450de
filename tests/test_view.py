"""The networkx view finds residual adds, norm sites and blocks structurally."""

import pytest

import outlierfx
from outlierfx.graph import OpKind, meta
from outlierfx.graph.ops import SDPA, op_kind
from outlierfx.graph.view import GraphView
from outlierfx.passes.fuse_attention import FuseAttention
from outlierfx.testing import build_model


@pytest.mark.parametrize("family,layers", [("bert", 2), ("gpt2", 3), ("llama", 2)])
def test_blocks_and_residual_adds(family, layers):
    g = build_model(family, layers=layers)
    view = GraphView(outlierfx.capture(g.model, g.inputs))
    assert len(view.blocks) == layers
    assert [r.kind for r in view.residual_adds] == ["attention", "mlp"] * layers
    for block in view.blocks:
        assert [r.kind for r in block.sublayers] == ["attention", "mlp"]
    assert len(view.norm_sites) == 2 * layers + 1


def test_fused_attention_still_starts_a_block():
    """FuseAttention replaces each softmax chain by one SDPA call; its blocks are the captured
    graph's (a block-order check of the fused graph loads one block's weights at a time: with
    one block found, it loaded every layer's at once, +410 MB on SmolLM2)."""
    g = build_model("llama", layers=3)
    captured = outlierfx.capture(g.model, g.inputs)
    fused = FuseAttention()(captured).graph_module
    assert any(n.target is SDPA for n in fused.graph.nodes)
    assert not any(op_kind(n) is OpKind.SOFTMAX for n in fused.graph.nodes)
    assert [b.path for b in GraphView(fused).blocks] == [b.path for b in GraphView(captured).blocks] \
        == [f"model.layers.{i}" for i in range(3)]


def test_post_ln_norms_feed_the_residual_stream():
    g = build_model("bert", layers=2)
    view = GraphView(outlierfx.capture(g.model, g.inputs))
    sites = view.norm_sites
    assert all(s.kind is OpKind.LAYER_NORM for s in sites)
    # Embedding LN and each attention/FFN LN except the very last carry the residual stream.
    assert [s.is_post_ln for s in sites] == [True, True, True, True, False]
    assert [len(s.linears) for s in sites] == [3, 1, 3, 1, 1]  # QKV, FFN-in, ..., pooler
    assert view.blocks[1].path == "encoder.layer.1"
    shortcuts = {r.shortcut for r in view.residual_adds}
    assert {s.norm for s in sites if s.is_post_ln} == shortcuts


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_pre_ln_norms_feed_only_linears(family):
    g = build_model(family, layers=2)
    view = GraphView(outlierfx.capture(g.model, g.inputs))
    blocks = view.norm_sites[:-1]
    assert not any(s.is_post_ln for s in view.norm_sites)
    # Llama: q/k/v then gate/up; GPT-2: one fused c_attn then c_fc.
    assert [len(s.linears) for s in blocks] == ([3, 2] if family == "llama" else [1, 1]) * 2
    assert all(not s.others for s in blocks)
    assert len(view.norm_sites[-1].linears) == 1  # final norm -> lm_head
    # The residual stream starts at the embeddings and chains through the adds.
    stream = view.residual_stream
    assert stream[0] is view.residual_adds[0].shortcut  # the embedding output opens the stream
    assert all(r.add in stream for r in view.residual_adds)
    assert view.blocks[0].path in ("transformer.h.0", "model.layers.0")


def test_describe_names_user_modules():
    g = build_model("llama", layers=1)
    view = GraphView(outlierfx.capture(g.model, g.inputs))
    text = view.describe()
    assert "block 0: model.layers.0 (attention+mlp)" in text
    assert "rms_norm model.layers.0.input_layernorm: feeds 3 linear" in text
    assert meta.module_path(view.norm_sites[-1].norm) == "model.norm"
