"""Capture without weights (issue 28, --low-memory's first step): a generated model saved with
save_pretrained, captured from its config on the meta device, computes exactly what its normal
capture computes once its weights are materialized from the safetensors files, and holds no
weight storage after they are released."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import outlierfx
from outlierfx.errors import CaptureError, DataError
from outlierfx.graph import meta
from outlierfx.graph.attrs import fetch_attr
from outlierfx.graph.weight_source import (StoredTensor, capture_without_weights, hold, materialize,
                                           materialized, release)
from outlierfx.models import build_without_weights
from outlierfx.quantizers.fake_quant import quantize_weight
from outlierfx.quantizers.integer_codes import integer_weight
from outlierfx.quantizers.policy import make_policy
from outlierfx.testing import build_model


def _saved(tmp_path, family="llama", shard="5GB", **options):
    g = build_model(family, layers=2, **options)
    g.model.save_pretrained(tmp_path, max_shard_size=shard)
    return g


def _real_tensors(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    tensors = dict([*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)])
    return {name: t for name, t in tensors.items() if t.device.type != "meta"}


@pytest.mark.parametrize("options", [dict(tied=True, kv_heads=2), dict(bias=True, shard="20KB")],
                         ids=["tied-gqa", "biases-sharded"])
def test_materialized_weightless_capture_equals_the_normal_capture(tmp_path, options):
    g = _saved(tmp_path, **options)  # the test's own dict: shard goes to save_pretrained
    gm = capture_without_weights(tmp_path, g.inputs)
    source = gm.meta[meta.GM_WEIGHT_SOURCE]
    if "shard" in options:  # each tensor loads from the shard that holds it
        assert len({stored.file for stored in source.tensors.values()}) > 1
    if options.get("tied"):  # the LM head loads the one key the checkpoint stores for it and the embedding
        assert source.tensors["lm_head.weight"].key == "model.embed_tokens.weight"
    # captured: every checkpoint tensor on meta; only the computed rotary frequencies are real
    assert set(_real_tensors(gm)) == {"model.rotary_emb.inv_freq"}

    materialize(gm, source.tensors)
    reference = outlierfx.capture(g.model, g.inputs)
    assert [n.name for n in gm.graph.nodes] == [n.name for n in reference.graph.nodes]
    with torch.no_grad():
        assert torch.equal(gm(**g.inputs).logits, reference(**g.inputs).logits)

    release(gm, source.tensors)
    assert set(_real_tensors(gm)) == {"model.rotary_emb.inv_freq"}


def test_materialize_loads_only_the_named_tensors_and_keeps_ties(tmp_path):
    g = _saved(tmp_path, tied=True)
    gm = capture_without_weights(tmp_path, g.inputs)
    block = [t for t in gm.meta[meta.GM_WEIGHT_SOURCE].tensors if t.startswith("model.layers.1.")]
    materialize(gm, block)
    assert set(_real_tensors(gm)) == {*block, "model.rotary_emb.inv_freq"}
    expected = g.model.state_dict()
    for target in block:
        assert torch.equal(fetch_attr(gm, target), expected[target])
    release(gm, block)
    materialize(gm, ["lm_head.weight"])
    assert torch.equal(fetch_attr(gm, "lm_head.weight"), g.model.get_input_embeddings().weight)
    with pytest.raises(ValueError, match="not tensors this graph loads"):
        materialize(gm, ["model.rotary_emb.inv_freq"])


def test_a_held_weight_loads_from_its_codes_and_materialized_releases_even_on_error(tmp_path):
    g = _saved(tmp_path)
    gm = capture_without_weights(tmp_path, g.inputs)
    target, spec = "model.layers.0.mlp.up_proj.weight", make_policy("full", "W4A8").weight
    with materialized(gm, [target]):
        assert torch.equal(fetch_attr(gm, target), g.model.state_dict()[target])
        rewritten = quantize_weight(fetch_attr(gm, target), spec)[0]
    assert fetch_attr(gm, target).device.type == "meta"

    loaded_from = gm.meta[meta.GM_WEIGHT_SOURCE]
    hold(gm, {target: integer_weight(rewritten, spec)})
    assert isinstance(loaded_from.tensors[target], StoredTensor)  # a new source: the old one is not edited
    with pytest.raises(RuntimeError, match="inside"):
        with materialized(gm, [target]):
            assert torch.equal(fetch_attr(gm, target), rewritten)  # the latest version, bit for bit
            raise RuntimeError("inside")
    assert fetch_attr(gm, target).device.type == "meta"


def test_a_tensor_missing_from_the_checkpoint_is_named(tmp_path):
    g = _saved(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DataError, match="no tensor 'model.layers.1.mlp.up_proj.weight'"):
        capture_without_weights(tmp_path, g.inputs)


def test_a_folder_without_safetensors_is_refused(tmp_path):
    g = build_model("llama", layers=1)
    g.model.config.save_pretrained(tmp_path)
    with pytest.raises(DataError, match="no safetensors weights"):
        capture_without_weights(tmp_path, g.inputs)


def test_a_gain_computed_from_weights_at_capture_is_refused(tmp_path):
    g = _saved(tmp_path, family="gemma")  # canonicalization stores Gemma's 1 + weight as a new tensor
    with pytest.raises(CaptureError, match="computed at capture from its weights"):
        capture_without_weights(tmp_path, g.inputs)


def test_a_buffer_init_weights_does_not_compute_is_refused(tmp_path, monkeypatch):
    from transformers import LlamaPreTrainedModel

    _saved(tmp_path)
    monkeypatch.setattr(LlamaPreTrainedModel, "_init_weights", lambda self, module: None)
    with pytest.raises(DataError, match="buffer 'inv_freq' of LlamaRotaryEmbedding"):
        build_without_weights(tmp_path)
