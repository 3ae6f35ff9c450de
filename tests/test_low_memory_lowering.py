"""Lower on a graph captured without weights and converted block by block (issue 28,
``--low-memory``): the int8 kernels are built from the int8 codes the weight source holds, no
float weight of a quantized tensor is ever rebuilt, the tensors nothing quantizes (norm gains)
are loaded from the checkpoint, and the lowered model is the full-memory lowering's: the same
tensors bit for bit (int8 weights, scales), the same logits, and it runs without the source."""

from __future__ import annotations

import pytest
import torch

import outlierfx
import outlierfx.graph.weight_source as weight_source
from outlierfx.backends import runnable_backends
from outlierfx.backends.int8_linear import QuantizedLinear
from outlierfx.graph import meta
from outlierfx.graph.attrs import fetch_attr
from outlierfx.graph.weight_source import capture_without_weights, held_codes
from outlierfx.passes import Calibrate, ConvertToFakeQuant, FuseAttention, InsertObservers, Lower
from outlierfx.passes.lower import lower_model
from outlierfx.quantizers.integer_codes import HeldCodes, quantized_weights
from outlierfx.quantizers.policy import make_policy
from outlierfx.testing import saved_llama

LAYERS = 2


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The full-memory conversion and the weight-free one of a tied GQA Llama saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("llama")
    g, batches = saved_llama(folder, LAYERS, ((1, 8, 2), (2, 5, 3)))
    policy = make_policy("full")
    convert = ConvertToFakeQuant(policy.weight, policy.embedding)

    def converted_from(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        return convert(Calibrate(batches)(InsertObservers("full")(gm).graph_module).graph_module).graph_module

    full = converted_from(outlierfx.capture(g.model, g.inputs))
    return full, converted_from(capture_without_weights(folder, g.inputs)), batches


def _tensors(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict([*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)])


@pytest.mark.parametrize("backend", runnable_backends(("reference", "onednn")))
def test_lowering_a_weight_free_graph_builds_the_full_memory_kernels_from_the_held_codes(converted, backend,
                                                                                          monkeypatch):
    full, light, batches = converted
    expected = Lower(backend)(FuseAttention()(full).graph_module).graph_module  # what lower_model runs
    light = FuseAttention()(light).graph_module
    loaded: list[str] = []
    materialize = weight_source.materialize

    def recording(gm, names):
        names = list(names)
        loaded.extend(names)
        materialize(gm, names)

    def no_float_weights(self):
        raise AssertionError("a held weight was rebuilt in float")

    monkeypatch.setattr(weight_source, "materialize", recording)
    monkeypatch.setattr(HeldCodes, "weight", no_float_weights)
    lowered = Lower(backend)(light).graph_module
    monkeypatch.undo()

    # loaded from the checkpoint: only what nothing quantizes (the norm gains), no weight matrix
    assert {t.rsplit(".", 1)[0].rsplit(".", 1)[-1] for t in loaded} == {"input_layernorm", "post_attention_layernorm",
                                                                         "norm"}
    # the lowered model is the full-memory one, bit for bit, and holds everything it reads
    assert meta.GM_WEIGHT_SOURCE not in lowered.meta
    got, want = _tensors(lowered), _tensors(expected)
    assert got.keys() == want.keys()
    assert not [name for name, t in got.items() if t.is_meta]
    int8 = [name for name, t in want.items() if t.dtype == torch.int8]
    assert len(int8) >= 7 * LAYERS // (2 if backend == "onednn" else 1)  # merged Q/K/V, gate/up on onednn
    for name, tensor in want.items():
        assert tensor.dtype == got[name].dtype and torch.equal(tensor, got[name]), name
    with torch.no_grad():
        for batch in batches:
            assert torch.equal(lowered(**batch).logits, expected(**batch).logits)

    # what save writes: the fake-quant graph, rebuilt from the held codes, equals the full conversion's
    lowered_from = lowered.meta[meta.GM_LOWERED_FROM]
    assert meta.GM_WEIGHT_SOURCE not in lowered_from.compact.meta
    rebuilt = lowered_from.fake_quant()
    assert set(lowered_from.codes) == set(quantized_weights(full))
    for name, tensor in _tensors(full).items():
        assert torch.equal(fetch_attr(rebuilt, name), tensor), name


def test_lower_model_checks_a_weight_free_graph_in_block_order(converted, tmp_path):
    """The pass manager checks each pass's outputs; a weight-free graph runs in block order for it
    (its logits are the loaded graph's), so the audit records the full-memory run's errors. The
    int8 model saves and reloads without the checkpoint it was captured from."""
    full, light, batches = converted
    expected, expected_audit = lower_model(full, "reference")
    lowered, audit = lower_model(light, "reference")
    assert [e.pass_name for e in audit.entries] == ["FuseAttention", "Lower"]
    assert audit.entries[-1].error_vs_reference is not None  # Lower was checked
    for got, want in zip(audit.entries, expected_audit.entries):
        assert got.modified == want.modified and got.error_vs_reference == want.error_vs_reference
    assert not [name for name, t in _tensors(lowered).items() if t.is_meta]
    with torch.no_grad():
        for batch in batches:
            assert torch.equal(lowered(**batch).logits, expected(**batch).logits)
    reloaded = outlierfx.load(outlierfx.save(lowered, tmp_path / "int8"))
    with torch.no_grad():
        for batch in batches:
            assert torch.equal(reloaded(**batch).logits, lowered(**batch).logits)


@pytest.mark.skipif("onednn" not in runnable_backends(("onednn",)), reason="no onednn engine")
def test_merged_gemms_lowered_from_held_codes_hold_them_without_an_int8_copy(tmp_path):
    # Linear inputs quantized, outputs float: Q/K/V and gate/up merge into one GEMM each
    g, batches = saved_llama(tmp_path, LAYERS, ((1, 8, 2),))
    policy = make_policy("linear-inputs")
    observed = InsertObservers(policy)(capture_without_weights(tmp_path, g.inputs)).graph_module
    light = ConvertToFakeQuant(policy.weight, policy.embedding)(Calibrate(batches)(observed).graph_module).graph_module
    light = FuseAttention()(light).graph_module
    lowered = Lower("onednn")(light).graph_module
    assert [m for m in lowered.modules() if isinstance(m, QuantizedLinear) and m.row_blocks > 1]
    # every int8 tensor of the lowered model is one the weight source held: a merged GEMM keeps
    # its parts' rows (a stacked copy of them doubled them while the source graph lived)
    held = {held_codes(light, t).codes.untyped_storage().data_ptr() for t in quantized_weights(light)}
    assert {t.untyped_storage().data_ptr() for t in _tensors(lowered).values() if t.dtype == torch.int8} <= held
