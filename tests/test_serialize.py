"""outlierfx.save / outlierfx.load: bit-exact round trips on every backend, in this process and a
new one; a folder of JSON and safetensors only; no pickle is ever opened without trust_pickle."""

from __future__ import annotations

import collections
import json
import pathlib

import pytest
import torch
from safetensors.torch import load_file
from torch.fx.experimental.symbolic_shapes import free_symbols

import outlierfx
from outlierfx.backends import BackendError, runnable_backends
from outlierfx.backends.inductor import CompiledInt8
from outlierfx.errors import OutlierFXError, OutlierFXWarning, SavedFormatError
from outlierfx.graph import meta
from outlierfx.graph.attrs import fetch_attr
from outlierfx.quantizers.integer_codes import quantized_weights
from outlierfx.quantizers.observers import FakeQuantize
from outlierfx.serialize import GRAPH_FILE, MODEL_FILE, TENSORS_FILE, SavedModel
from outlierfx.serialize import vocabulary
from outlierfx.testing import build_model

OUTPUT = {"bert": "last_hidden_state", "llama": "logits"}


BACKENDS = runnable_backends(("onednn", "inductor", "x86", "reference"))


def _outputs(model, inputs, family):
    with torch.no_grad():
        return model(**inputs)[OUTPUT[family]]


def _quantized(family: str, backend: str | None, recipe: str | None = None):
    g = build_model(family, hidden=32, layers=2)
    qmodel, report = outlierfx.quantize(g.model, [g.inputs], recipe=recipe, backend=backend,
                                        generation=False, progress=False)
    return g, qmodel, report


def _assert_no_pickle(folder: pathlib.Path) -> None:
    """Every file is JSON or safetensors (read as such, not by name alone)."""
    for path in folder.iterdir():
        if path.suffix == ".safetensors":
            load_file(str(path))
        else:
            assert path.suffix == ".json", path.name
            json.loads(path.read_text())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_reload_is_bit_exact_on_each_backend(tmp_path, family, backend):
    g, qmodel, report = _quantized(family, backend)  # the backend's fast preset (first-token grids on most)
    folder = outlierfx.save(qmodel, tmp_path / "int8")
    assert {p.name for p in folder.iterdir()} == {GRAPH_FILE, TENSORS_FILE, "config.json"}
    _assert_no_pickle(folder)
    saved = json.loads((folder / GRAPH_FILE).read_text())
    assert saved["backend"] == backend and saved["format_version"] == 2
    assert json.loads((folder / "config.json").read_text())["hidden_size"] == 32
    attributes = saved["graph"]["attributes"]
    assert sum("int8" in a for a in attributes.values()) >= 2 * 4  # the Linear weights travel as int8 codes
    loaded = outlierfx.load(folder)
    kinds = collections.Counter(type(m).__name__ for m in loaded.modules())
    assert kinds == collections.Counter(type(m).__name__ for m in qmodel.modules())  # the same kernels
    assert torch.equal(_outputs(loaded, g.inputs, family), _outputs(qmodel, g.inputs, family))


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_fake_quant_model_reloads_as_is_or_lowered_to_another_backend(tmp_path, family):
    g, sim, report = _quantized(family, None, recipe="naive+sink")
    folder = outlierfx.save(sim, tmp_path / "sim")
    loaded = outlierfx.load(folder)
    assert any(isinstance(m, FakeQuantize) for m in loaded.modules())
    assert torch.equal(_outputs(loaded, g.inputs, family), _outputs(sim, g.inputs, family))
    lowered, _ = outlierfx.lower(sim, report, "reference")
    relowered = outlierfx.load(folder, backend="reference")
    assert torch.equal(_outputs(relowered, g.inputs, family), _outputs(lowered, g.inputs, family))
    # a lowered model saves its fake-quant graph: "fake-quant" brings that back
    outlierfx.save(lowered, tmp_path / "ref")
    back = outlierfx.load(tmp_path / "ref", backend="fake-quant")
    assert any(isinstance(m, FakeQuantize) for m in back.modules())


def _input_sizes(gm: torch.fx.GraphModule) -> list[list[int | str]]:
    """Each input's sizes: numbers, and symbols named by their order of appearance (sizes that
    share a symbol share the name)."""
    names: dict[str, str] = {}
    sizes = []
    for node in gm.graph.find_nodes(op="placeholder"):
        shape = node.meta["val"].shape
        sizes.append([names.setdefault(str(s), f"n{len(names)}") if free_symbols(s) else int(s) for s in shape])
    return sizes


def test_sizes_load_as_symbols_where_the_graph_has_them_and_as_numbers_elsewhere(tmp_path):
    _, bert, _ = _quantized("bert", None, recipe="naive")  # symbolic batch and sequence
    assert all(isinstance(size, str) for shape in _input_sizes(bert) for size in shape)
    assert _input_sizes(outlierfx.load(outlierfx.save(bert, tmp_path / "bert"))) == _input_sizes(bert)
    # a lowered KV-cache graph: lowering specialized every size (SymInts whose expression is a number)
    g = build_model("llama", layers=1, kv_heads=2)
    decoder, _ = outlierfx.quantize(g.model, [{"input_ids": torch.randint(0, 64, (3, 12))}], "naive",
                                    backend="reference", progress=False)
    fresh = _input_sizes(decoder.graph)
    assert all(isinstance(size, int) for shape in fresh for size in shape) and [3, 12] in fresh
    folder = outlierfx.save(decoder, tmp_path / "llama")
    doc = json.loads((folder / GRAPH_FILE).read_text())
    shapes = [n["meta"]["val"]["shape"] for n in doc["graph"]["nodes"] if "shape" in n["meta"].get("val", {})]
    assert shapes and all(isinstance(size, int) for shape in shapes for size in shape)
    assert _input_sizes(outlierfx.load(folder, backend="fake-quant").graph) == fresh
    for shape in shapes:  # as saves before sizes were written as numbers: a specialized 12 named "12"
        shape[:] = [str(size) for size in shape]
    (folder / GRAPH_FILE).write_text(json.dumps(doc))
    assert _input_sizes(outlierfx.load(folder, backend="fake-quant").graph) == fresh


def test_reload_in_a_new_process_is_bit_exact(tmp_path):
    from outlierfx.testing.round_trip import reload_in_new_process

    backend = "onednn" if "onednn" in BACKENDS else "x86"
    g, qmodel, _ = _quantized("llama", backend)
    results = reload_in_new_process({backend: qmodel}, g.inputs, tmp_path, timeout=300)
    assert results[backend]["bit_exact"], results


class _Payload:
    """Unpickling this creates ``marker``: a stand-in for arbitrary code in a crafted model.pt."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_planted_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "payload-ran"
    planted = tmp_path / "old"
    planted.mkdir()
    torch.save(_Payload(marker), planted / MODEL_FILE)  # where the old format kept its model
    with pytest.raises(OutlierFXError, match="trust_pickle=True"):
        outlierfx.load(planted)
    assert not marker.exists()
    # next to a real saved model, the pickle is not even opened
    g, qmodel, _ = _quantized("bert", "reference")
    with pytest.raises(OutlierFXError, match="model.pt exists"):  # save never deletes a model it did not write
        outlierfx.save(qmodel, planted)
    folder = outlierfx.save(qmodel, tmp_path / "int8")
    torch.save(_Payload(marker), folder / MODEL_FILE)
    assert torch.equal(_outputs(outlierfx.load(folder), g.inputs, "bert"), _outputs(qmodel, g.inputs, "bert"))
    assert not marker.exists()
    # the payload is real: opting in runs it (and then finds no model in it)
    with pytest.warns(OutlierFXWarning, match="unpickling"), pytest.raises(OutlierFXError, match="not a model"):
        outlierfx.load(planted, trust_pickle=True)
    assert marker.exists()


def test_an_old_pickled_folder_loads_only_with_trust_pickle(tmp_path):
    class Double(torch.nn.Module):
        def forward(self, x):
            return x * 2

    legacy = SavedModel()
    legacy.graph_module, legacy.in_spec, legacy.out_spec = torch.fx.symbolic_trace(Double()), None, None
    torch.save(legacy, tmp_path / MODEL_FILE)
    with pytest.raises(OutlierFXError, match="old pickled format"):
        outlierfx.load(tmp_path)
    with pytest.warns(OutlierFXWarning, match="trust_pickle=True"):
        model = outlierfx.load(tmp_path, trust_pickle=True)
    assert torch.equal(model(torch.ones(2)), torch.full((2,), 2.0))


def _edited(folder: pathlib.Path, edit) -> pathlib.Path:
    doc = json.loads((folder / GRAPH_FILE).read_text())
    edit(doc)
    (folder / GRAPH_FILE).write_text(json.dumps(doc))
    return folder


def test_load_refuses_unknown_ops_and_versions_with_the_fix(tmp_path):
    _, sim, _ = _quantized("bert", None, recipe="naive")
    for name in ("newer", "format", "torch", "op", "damaged", "backend"):
        outlierfx.save(sim, tmp_path / name)
    _edited(tmp_path / "backend", lambda d: d.update(backend="tensorrt"))  # saved where another backend runs
    with pytest.raises(BackendError, match="saved for backend 'tensorrt'.*load it with backend="):
        outlierfx.load(tmp_path / "backend")
    assert outlierfx.load(tmp_path / "backend", backend="reference") is not None
    (tmp_path / "damaged" / TENSORS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(SavedFormatError, match="cannot read .*model.safetensors"):
        outlierfx.load(tmp_path / "damaged")
    (tmp_path / "damaged" / GRAPH_FILE).write_text("{truncated")
    with pytest.raises(SavedFormatError, match="cannot read .*graph.json.*save the model again"):
        outlierfx.load(tmp_path / "damaged")
    _edited(tmp_path / "newer", lambda d: d.update(format_version=99))
    with pytest.raises(SavedFormatError, match="version 99.*upgrade outlierfx"):
        outlierfx.load(tmp_path / "newer")
    _edited(tmp_path / "format", lambda d: d.update(format="something-else"))
    with pytest.raises(SavedFormatError, match="not an outlierfx saved graph"):
        outlierfx.load(tmp_path / "format")
    _edited(tmp_path / "torch", lambda d: d.update(torch="99.0.0"))
    with pytest.raises(SavedFormatError, match="saved with torch 99.0.0.*use torch >= 99.0"):
        outlierfx.load(tmp_path / "torch")

    def rename_linear(doc):
        for node in doc["graph"]["nodes"]:
            if node["target"] == "aten.linear.default":
                node["target"] = "aten.linear_from_the_future.default"

    _edited(tmp_path / "op", rename_linear)
    with pytest.raises(SavedFormatError, match="'aten.linear_from_the_future.default'.*upgrade outlierfx"):
        outlierfx.load(tmp_path / "op")
    with pytest.raises(OutlierFXError, match="exists"):
        outlierfx.save(sim, tmp_path / "op")


def test_the_vocabulary_allows_aten_ops_and_our_own_and_nothing_else(tmp_path, monkeypatch):
    for op in (torch.ops.aten.log.default, torch.ops.aten.add_.Tensor):  # in no hand list: MPNet calls both
        assert vocabulary.target_of(vocabulary.name_of(op)) is op
    for refused in (print, eval, torch.nn.functional.gelu):
        assert vocabulary.name_of(refused) is None  # not an aten op
    for name in ("builtins.eval", "aten.__class__.x", "aten.log", "os.system.default", "aten.no_such_op.default"):
        assert vocabulary.target_of(name) is None
    _, sim, _ = _quantized("bert", None, recipe="naive")
    gelu = next(n for n in sim.graph.nodes if n.target is torch.ops.aten.gelu.default)
    own = lambda x: torch.ops.aten.gelu.default(x)  # noqa: E731  (a function of our own, unregistered)
    gelu.target = own
    with pytest.raises(OutlierFXError, match="may not call.*vocabulary.OPS"):
        outlierfx.save(sim, tmp_path / "a")
    monkeypatch.setitem(vocabulary.OPS, "tests.own_gelu", own)  # one line registers
    outlierfx.save(sim, tmp_path / "b")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_lowered_model_holds_int8_codes_not_float_copies_of_its_weights(tmp_path, backend):
    # the fake-quant graph a lowered model keeps for save/export held every weight in float32 too:
    # on SmolLM2 the int8 model took 2x FP32's memory
    g, qmodel, report = _quantized("llama", backend)
    lowered_from = (qmodel.reference if isinstance(qmodel, CompiledInt8) else qmodel).meta[meta.GM_LOWERED_FROM]
    weights = quantized_weights(lowered_from.compact)
    assert len(weights) >= 2 * 7  # q, k, v, o, gate, up, down per layer
    assert all(fetch_attr(lowered_from.compact, t).is_meta for t in weights)
    assert set(lowered_from.codes) == set(weights)
    assert all(held.codes.dtype == torch.int8 for held in lowered_from.codes.values())
    if backend in ("onednn", "x86"):  # kernels keep plain int8 weights: the codes are views of them
        held = {t.untyped_storage().data_ptr() for t in qmodel.buffers()}
        assert all(h.codes.untyped_storage().data_ptr() in held for h in lowered_from.codes.values())
    # what save writes is unchanged: the fake-quant graph's tensors, rebuilt bit for bit
    rebuilt = lowered_from.fake_quant()
    simulated = report.graphs.simulated
    for target in weights:
        assert torch.equal(fetch_attr(rebuilt, target), fetch_attr(simulated, target))
    folder = outlierfx.save(qmodel, tmp_path / "int8")
    assert torch.equal(_outputs(outlierfx.load(folder), g.inputs, "llama"), _outputs(qmodel, g.inputs, "llama"))


def test_a_tied_embedding_and_lm_head_are_saved_once(tmp_path):
    g = build_model("llama", hidden=32, layers=1, vocab=96, tied=True)
    qmodel, _ = outlierfx.quantize(g.model, [g.inputs], recipe="naive", backend="reference",
                                   generation=False, progress=False)
    folder = outlierfx.save(qmodel, tmp_path / "tied")
    tables = [v for v in load_file(str(folder / TENSORS_FILE)).values() if v.dim() == 2 and v.shape[0] == 96]
    assert len(tables) == 1
    assert torch.equal(_outputs(outlierfx.load(folder), g.inputs, "llama"), _outputs(qmodel, g.inputs, "llama"))


def test_save_refuses_a_model_outlierfx_did_not_make(tmp_path):
    with pytest.raises(OutlierFXError, match="outlierfx.quantize"):
        outlierfx.save(torch.nn.Linear(2, 2), tmp_path)


@pytest.mark.slow
def test_minilm_reloads_bit_exactly_in_a_new_process_on_each_backend(minilm, tmp_path):
    """Issue 27's round trip on a real model: each backend's preset (x86 has its own), lowered,
    saved, and loaded by one new process, output for output (SmolLM2: bench/scripts/round_trip.py)."""
    from outlierfx.corpus import calibration_batches, wikipedia_sample
    from outlierfx.models import encode
    from outlierfx.testing.round_trip import lowered_presets, reload_in_new_process

    batches = calibration_batches(minilm, wikipedia_sample("calibration", 16), 128, 8, source="wikipedia")
    inputs = encode(minilm, wikipedia_sample("evaluation", 4), 64)
    results = reload_in_new_process(lowered_presets(minilm.model, batches, BACKENDS), inputs, tmp_path)
    assert set(results) == set(BACKENDS)
    assert all(r["bit_exact"] for r in results.values()), results
