"""ConvertToFakeQuant on a graph captured without weights (issue 28, the per-block passes'
first step): block by block, each block's weights are loaded, quantized, held as int8 codes and
released; the result is the full-memory conversion's fake-quant graph exactly (the same
quantizers, and bit for bit the same weights once materialized from the codes), and no more
than one block's float weights are in memory at any point of the conversion."""

from __future__ import annotations

import pytest
import torch

import outlierfx
import outlierfx.passes.convert_fake_quant as convert_fake_quant
from outlierfx.errors import PassError
from outlierfx.graph import meta
from outlierfx.graph.attrs import fetch_attr
from outlierfx.graph.block_order import run_in_block_order
from outlierfx.graph.copy import copy_graph_module
from outlierfx.graph.weight_source import StoredTensor, capture_without_weights, materialize
from outlierfx.passes import Calibrate, ConvertToFakeQuant, InsertObservers
from outlierfx.quantizers.fake_quant import quantize_weight
from outlierfx.quantizers.integer_codes import HeldCodes, quantize_to_codes
from outlierfx.quantizers.observers import FakeQuantize, Observer
from outlierfx.quantizers.policy import make_policy
from outlierfx.quantizers.spec import Estimator, Granularity
from outlierfx.testing import saved_llama

LAYERS = 3
COMPUTED = {"model.rotary_emb.inv_freq"}  # computed at capture, not loaded: real throughout


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    g, batches = saved_llama(folder, LAYERS, ((1, 8, 2), (2, 5, 3), (3, 11, 1)))
    return g, folder, batches


def _calibrated(gm: torch.fx.GraphModule, batches) -> torch.fx.GraphModule:
    return Calibrate(batches)(InsertObservers("full")(gm).graph_module).graph_module


def _tensors(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    return dict([*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)])


def _real(gm: torch.fx.GraphModule) -> set[str]:
    """The graph's tensors with storage, but the quantizers' own (scales, zero points)."""
    quantizers = {name for name, m in gm.named_children() if isinstance(m, (Observer, FakeQuantize))}
    return {name for name, t in _tensors(gm).items()
            if t.device.type != "meta" and name.split(".")[0] not in quantizers}


def _block(target: str) -> str | None:
    parts = target.split(".")
    return ".".join(parts[:3]) if target.startswith("model.layers.") else None


@pytest.mark.parametrize("bits", ["W8A8", "W4A8"])
def test_block_order_conversion_equals_the_full_memory_conversion(saved, bits):
    g, folder, batches = saved
    policy = make_policy("full", bits)
    convert = ConvertToFakeQuant(policy.weight, policy.embedding)
    full = convert(_calibrated(outlierfx.capture(g.model, g.inputs), batches)).graph_module
    calibrated = _calibrated(capture_without_weights(folder, g.inputs), batches)
    light = convert(calibrated).graph_module
    # the pass worked on its copy: the input graph still loads every weight from the checkpoint
    assert all(isinstance(e, StoredTensor) for e in calibrated.meta[meta.GM_WEIGHT_SOURCE].tensors.values())

    assert [n.name for n in light.graph.nodes] == [n.name for n in full.graph.nodes]
    assert [n.meta.get(meta.WEIGHT_QUANT) for n in light.graph.nodes] == \
        [n.meta.get(meta.WEIGHT_QUANT) for n in full.graph.nodes]
    quantizers = {name: m for name, m in full.named_modules() if isinstance(m, FakeQuantize)}
    assert len(quantizers) > 10 * LAYERS
    for name, quantizer in quantizers.items():
        other = light.get_submodule(name)
        assert isinstance(other, FakeQuantize)
        assert torch.equal(quantizer.scale, other.scale) and torch.equal(quantizer.zero_point, other.zero_point), name

    # converted: nothing real but the computed buffer; the quantized weights are held as codes
    assert _real(light) == COMPUTED
    source = light.meta[meta.GM_WEIGHT_SOURCE]
    held = {t for t, entry in source.tensors.items() if isinstance(entry, HeldCodes)}
    assert len(held) == 7 * LAYERS + 2  # each block's 7 Linears; the table and the tied head reading its grid
    assert {"lm_head.weight", "lm_head.weight_quantized"} <= held
    assert all(source.tensors[t].codes.dtype == torch.int8 for t in held)
    assert isinstance(source.tensors["model.norm.weight"], StoredTensor)  # nothing quantizes a gain

    materialize(light, source.tensors)
    expected, got = _tensors(full), _tensors(light)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name
    assert fetch_attr(light, "lm_head.weight") is fetch_attr(light, "lm_head.weight_quantized")  # tied: one tensor
    with torch.no_grad():
        for batch in batches:
            assert torch.equal(light(**batch).logits, full(**batch).logits)


def test_a_block_order_forward_of_the_converted_graph_loads_the_codes(saved):
    g, folder, batches = saved
    policy = make_policy("full")
    convert = ConvertToFakeQuant(policy.weight, policy.embedding)
    full = convert(_calibrated(outlierfx.capture(g.model, g.inputs), batches)).graph_module
    light = convert(_calibrated(capture_without_weights(folder, g.inputs), batches)).graph_module
    run = run_in_block_order(light, batches)
    with torch.no_grad():
        for batch, output in zip(batches, run.outputs):
            assert torch.equal(output.logits, full(**batch).logits)
    assert _real(light) == COMPUTED


def test_one_block_of_float_weights_at_a_time(saved, monkeypatch):
    g, folder, batches = saved
    policy = make_policy("full")
    convert = ConvertToFakeQuant(policy.weight, policy.embedding)
    work = copy_graph_module(_calibrated(capture_without_weights(folder, g.inputs), batches))
    plan = convert.analyze(work)
    held: list[set[str]] = []
    quantize_to_codes = convert_fake_quant.quantize_to_codes

    def recording(weight, spec):
        held.append(_real(work) - COMPUTED)
        return quantize_to_codes(weight, spec)

    monkeypatch.setattr(convert_fake_quant, "quantize_to_codes", recording)
    convert.apply(work, plan)
    assert len(held) == 7 * LAYERS + 1  # every Linear weight, and the table once for its two readers
    blocks = [{_block(t) for t in now} for now in held]
    assert all(len(b) == 1 for b in blocks)  # one block's tensors, or one tensor outside blocks
    assert {b for now in blocks for b in now} == {*(f"model.layers.{i}" for i in range(LAYERS)), None}
    assert max(len(now) for now in held) == 7  # a block's Linear weights, no quantized float copies
    # outside blocks only the tied table, quantized once for the embedding and the LM head
    assert {t for now in held for t in now if _block(t) is None} == {"lm_head.weight"}
    assert _real(work) == COMPUTED


def test_a_grid_without_int8_codes_is_refused(saved):
    g, folder, batches = saved
    policy = make_policy("full")
    asymmetric = policy.weight.with_(symmetric=False)
    assert asymmetric.granularity is Granularity.PER_CHANNEL
    light = _calibrated(capture_without_weights(folder, g.inputs), batches)
    with pytest.raises(PassError, match="no int8 codes"):
        ConvertToFakeQuant(asymmetric, policy.embedding)(light)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("estimator", [Estimator.MINMAX, Estimator.MSE])
def test_codes_quantized_row_block_by_row_block_rebuild_the_whole_quantized_weight(bits, estimator):
    torch.manual_seed(0)
    weight = torch.randn(101, 48) * torch.rand(101, 1) * 3
    weight[7, 5] = 40.0  # an outlier row: its own scale
    spec = make_policy("full", f"W{bits}A8").weight.with_(estimator=estimator)
    whole = quantize_weight(weight, spec)[0]
    held = quantize_to_codes(weight, spec, rows=16)  # 7 row blocks, the last one short
    assert held.codes.dtype == torch.int8 and held.codes.shape == weight.shape and held.scale.shape == (101,)
    assert int(held.codes.abs().max()) == spec.qmax
    assert torch.equal(held.weight().view(torch.int32), whole.view(torch.int32))
    assert quantize_to_codes(weight, spec.with_(granularity=Granularity.PER_TENSOR)) is None
