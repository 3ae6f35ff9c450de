"""capture() on generated BERT / GPT-2 / Llama models, and ModernBERT / Qwen2 / Gemma with a massive
first token: exact outputs and canonical ops."""

import torch
from hypothesis import given, settings

import outlierfx
from outlierfx.graph import OpKind, count_ops, meta
from outlierfx.graph.ops import aten
from outlierfx.testing import MORE_FAMILIES, RMSNORM_FAMILIES, assert_equivalent, build_model, transformer_models

TOL = 1e-5  # of the output's max magnitude


def _targets(gm):
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


def _check_capture(g):
    # within TOL of the output's max, or, where fp32 rounding alone is near TOL (large injected
    # outliers), within 2x the fp32 model's own distance from a float64 copy (capture allows 4x)
    gm = outlierfx.capture(g.model, g.inputs, rel_tol=TOL)
    report = gm.meta[meta.GM_CAPTURE_REPORT]
    if not report.error.within(TOL):
        assert report.float_error <= 2 * report.float_noise + 1e-6 * report.error.reference_max, report
    targets = _targets(gm)
    # Fused ops are gone: attention is explicit, RMSNorm is one node, GPT-2 Conv1D is a linear.
    assert aten.scaled_dot_product_attention.default not in targets
    assert not targets & {aten.rsqrt.default, aten.addmm.default, aten.mm.default}
    counts = count_ops(gm)
    layers = g.config.num_hidden_layers
    assert counts[OpKind.SOFTMAX.value] == layers
    assert counts[OpKind.MATMUL.value] == 2 * layers
    norms = counts[OpKind.LAYER_NORM.value] + counts[OpKind.RMS_NORM.value]
    # two per block plus the embedding (BERT) or final (GPT-2, Llama) norm; ModernBERT has both,
    # and no norm before its first attention
    assert norms == 2 * layers + 1
    if g.family in RMSNORM_FAMILIES:
        assert counts[OpKind.RMS_NORM.value] == norms
        assert not targets & {aten.pow.Tensor_Scalar, aten.mean.dim}
    return gm


@settings(max_examples=50)
@given(g=transformer_models(families=("bert",)))
def test_capture_preserves_outputs_bert(g):
    _check_capture(g)


@settings(max_examples=50)
@given(g=transformer_models(families=("gpt2",)))
def test_capture_preserves_outputs_gpt2(g):
    _check_capture(g)


@settings(max_examples=50)
@given(g=transformer_models(families=("llama",)))
def test_capture_preserves_outputs_llama(g):
    _check_capture(g)


@settings(max_examples=15)
@given(g=transformer_models(families=MORE_FAMILIES, first_token=True))
def test_capture_preserves_outputs_beyond_bert_gpt2_llama(g):
    _check_capture(g)


def test_graph_accepts_other_batch_and_sequence_sizes():
    g = build_model("llama", batch=2, seq=6)
    gm = outlierfx.capture(g.model, g.inputs)
    other = build_model("llama", batch=3, seq=11, seed=1).inputs
    assert_equivalent(g.model, gm, other, tol=TOL)


def test_capture_does_not_modify_the_model():
    g = build_model("gpt2")
    g.model.train()  # capture must trace in eval mode and give the flag back
    before = {k: v.clone() for k, v in g.model.state_dict().items()}
    forward_before = g.model.forward
    outlierfx.capture(g.model, g.inputs)
    assert g.model.training and all(m.training for m in g.model.modules())
    assert "forward" not in vars(g.model) and g.model.forward == forward_before
    after = g.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_nodes_keep_user_module_paths():
    g = build_model("bert", layers=2)
    gm = outlierfx.capture(g.model, g.inputs)
    norm_paths = [meta.module_path(n) for n in gm.graph.nodes if n.target is aten.layer_norm.default]
    assert norm_paths == [
        "embeddings.LayerNorm",
        "encoder.layer.0.attention.output.LayerNorm",
        "encoder.layer.0.output.LayerNorm",
        "encoder.layer.1.attention.output.LayerNorm",
        "encoder.layer.1.output.LayerNorm",
    ]
    linear_paths = {meta.module_path(n) for n in gm.graph.nodes if n.target is aten.linear.default}
    assert "encoder.layer.1.intermediate.dense" in linear_paths


def test_capture_records_a_report():
    g = build_model("llama")
    gm = outlierfx.capture(g.model, g.inputs)
    report = gm.meta[meta.GM_CAPTURE_REPORT]
    assert report.rewrites["fuse_rms_norm"] == 5 and report.rewrites["decompose_attention"] == 2
    assert report.error.max_rel <= TOL and report.num_nodes == len(gm.graph.nodes)
    assert report.as_dict()["op_counts"]["rms_norm"] == 5
