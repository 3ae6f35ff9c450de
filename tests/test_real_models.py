"""capture() on the packaged pretrained checkpoints (slow: loads real weights)."""

import pytest

import outlierfx
from outlierfx import corpus
from outlierfx.graph import OpKind, count_ops, meta
from outlierfx.graph.ops import aten
from outlierfx.graph.view import GraphView
from outlierfx.models import encode
from outlierfx.testing import assert_equivalent

pytestmark = pytest.mark.slow
TOL = 1e-5  # max abs error <= TOL x max |output|


def _batch(loaded, texts, max_length):
    return encode(loaded, texts, max_length)


def test_minilm_capture_is_exact_and_canonical(minilm):
    texts = corpus.wikipedia("evaluation")[:6] + ["A short one.", "Two words"]
    inputs = _batch(minilm, texts, 128)
    gm = outlierfx.capture(minilm.model, inputs)
    error = gm.meta[meta.GM_CAPTURE_REPORT].error
    assert error.max_abs <= TOL * error.reference_max
    # A second, differently shaped batch goes through the same graph.
    other = _batch(minilm, corpus.news()[:3], 64)
    assert_equivalent(minilm.model, gm, other, tol=TOL)

    counts = count_ops(gm)
    assert counts[OpKind.LAYER_NORM.value] == 13  # 2 per block + embeddings
    view = GraphView(gm)
    block_linears = [n for n in gm.graph.nodes if n.target is aten.linear.default
                     and meta.module_path(n).startswith("encoder.layer.")]
    assert len(block_linears) == 36
    assert counts[OpKind.LINEAR.value] == 37  # + the pooler
    assert len(view.blocks) == 6 and [b.path for b in view.blocks] == [f"encoder.layer.{i}" for i in range(6)]
    assert meta.module_path(view.norm_sites[3].norm) == "encoder.layer.1.attention.output.LayerNorm"


def test_smollm2_capture_is_exact_and_canonical(smollm2):
    texts = corpus.wikipedia("evaluation")[:2]
    inputs = _batch(smollm2, texts, 96)
    gm = outlierfx.capture(smollm2.model, inputs)
    error = gm.meta[meta.GM_CAPTURE_REPORT].error
    assert error.max_abs <= TOL * error.reference_max
    assert gm(**inputs).logits.shape == (2, inputs["input_ids"].shape[1], 49152)  # full causal-LM head

    counts = count_ops(gm)
    config = smollm2.model.config
    assert counts[OpKind.RMS_NORM.value] == 2 * config.num_hidden_layers + 1
    targets = {n.target for n in gm.graph.nodes}
    assert not targets & {aten.rsqrt.default, aten.pow.Tensor_Scalar, aten.mean.dim}
    assert counts[OpKind.LINEAR.value] == 7 * config.num_hidden_layers + 1
    view = GraphView(gm)
    assert len(view.blocks) == config.num_hidden_layers
    assert not any(site.is_post_ln for site in view.norm_sites)


def test_smollm2_tied_lm_head_reads_the_embedding_weight(smollm2):
    inputs = _batch(smollm2, ["The tied weight is read once."], 16)
    gm = outlierfx.capture(smollm2.model, inputs, check=False)
    embedding = next(n for n in gm.graph.nodes if n.target is aten.embedding.default)
    lm_head = [n for n in gm.graph.nodes if n.target is aten.linear.default][-1]
    assert embedding.args[0] is lm_head.args[1]  # one get_attr, shared: passes see the tie


@pytest.mark.parametrize("channels", ["all", "amplifying"])
def test_gamma_migration_on_minilm_is_exact(minilm, channels):
    from outlierfx.passes.migrate_gamma import MigrateGamma

    inputs = _batch(minilm, corpus.wikipedia("evaluation")[:8], 128)
    gm = outlierfx.capture(minilm.model, inputs)
    result = MigrateGamma(channels=channels)(gm)
    assert result.modified
    if channels == "all":
        assert len(result.plan.migrations) == 13 and not result.plan.skipped
    assert_equivalent(minilm.model, result.graph_module, inputs, tol=TOL)


def test_gamma_migration_on_smollm2_is_exact(smollm2):
    from outlierfx.passes.migrate_gamma import MigrateGamma

    inputs = _batch(smollm2, corpus.wikipedia("evaluation")[:2], 96)
    result = MigrateGamma()(outlierfx.capture(smollm2.model, inputs))
    assert len(result.plan.migrations) == 2 * smollm2.model.config.num_hidden_layers + 1
    assert result.plan.migrations[-1].tied_weights  # lm_head shares the embedding table
    assert_equivalent(smollm2.model, result.graph_module, inputs, tol=TOL)
