"""ONNX export (outlierfx.export_onnx, ``outlierfx export``): a QDQ model that ONNX Runtime runs
with int8 GEMMs and that computes what our reference int8 form computes, on generated models
(first-token grids and the online Hadamard included); what QDQ cannot express is refused."""

from __future__ import annotations

import collections

import numpy as np
import onnx  # the onnx extra: scripts/setup.sh installs it, so a missing package fails here, not skips
import onnxruntime as ort
import pytest
import torch

import outlierfx
from outlierfx.cli import main
from outlierfx.errors import ExportError
from outlierfx.export import OnnxRuntimeModel, graph_to_onnx
from outlierfx.graph import meta
from outlierfx.graph.ops import OpKind, op_kind
from outlierfx.graph.hadamard_op import HADAMARD
from outlierfx.passes.lower import lower_model
from outlierfx.serialize import pre_lowering
from outlierfx.testing import build_model

OUTPUT = {"bert": "last_hidden_state", "llama": "logits"}
# llama: SmolLM2's structure in small (grouped-query attention, lm_head tied to the embedding)
SHAPE = {"bert": {}, "llama": {"heads": 4, "kv_heads": 2, "tied": True}}
# ORT divides by the scale where torch multiplies by its inverse, and sums int8 products in
# int32 before scaling: a code at a rounding tie may land one step away
REL_TOL = 1e-3


def _quantized(family: str, backend: str = "reference", **quantize_options):
    g = build_model(family, hidden=32, layers=2, **SHAPE[family])
    qmodel, report = outlierfx.quantize(g.model, [g.inputs], backend=backend,
                                        generation=False, progress=False, **quantize_options)
    return g, qmodel, report


def _assert_close(onnx_model, torch_model, inputs, output: str) -> None:
    with torch.no_grad():
        expected = torch_model(**inputs)[output]
    got = getattr(onnx_model(**inputs), output)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= REL_TOL * expected.abs().max()


def _ort_fused_ops(path, tmp_path) -> collections.Counter:
    """The op types of the graph ONNX Runtime runs after its optimizations (its QDQ fusions)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_exported_model_runs_int8_in_onnx_runtime_as_our_reference_form(tmp_path, family, every_first_token_grid):
    g, qmodel, report = _quantized(family)  # the fast preset: smooth-fold+sink (bert), rotate+sink (llama)
    path = outlierfx.export_onnx(qmodel, tmp_path / "model.onnx")
    graph = onnx.load(str(path)).graph
    ops = collections.Counter(n.op_type for n in graph.node)
    linears = sum(1 for n in pre_lowering(qmodel)[0].graph.nodes if n.op == "call_function"
                  and op_kind(n) is OpKind.LINEAR and meta.WEIGHT_QUANT in n.meta)  # the quantized Linears
    initializers = {t.name: t for t in graph.initializer}
    int8_weights = {n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"
                    and initializers.get(n.input[0]) is not None
                    and initializers[n.input[0]].data_type == onnx.TensorProto.INT8
                    and len(initializers[n.input[1]].dims) == 1}  # per channel: one scale per output
    assert len(int8_weights) == linears
    produced_by = {out: n.op_type for n in graph.node for out in n.output}
    assert not [n for n in graph.node if n.op_type == "Transpose" and produced_by.get(n.input[0]) == "DequantizeLinear"]
    # each text's first-token rows gathered where the graph's first-token mask says, and back
    assert ops["QuantizeLinear"] >= 2 * 4 and ops["GatherElements"] >= 2
    assert {n.domain for n in graph.node} <= {""}  # standard ONNX only: no custom op for ORT to lack
    if family == "llama":
        assert any(n.target is HADAMARD for n in pre_lowering(qmodel)[0].graph.nodes)
    with torch.no_grad():
        assert [o.name for o in graph.output] == list(qmodel(**g.inputs).keys())  # the ModelOutput's names
    fused = _ort_fused_ops(path, tmp_path)
    assert fused["MatMulIntegerToFloat"] >= linears  # every Linear an int8 GEMM (+sink: a second one on the first rows)
    assert fused["DequantizeLinear"] == 0  # no float GEMM on dequantized weights left

    session = OnnxRuntimeModel(path)
    for seed, (batch, seq) in enumerate([(2, 8), (3, 13), (1, 1)]):  # dynamic batch and sequence
        inputs = build_model(family, hidden=32, layers=2, batch=batch, seq=seq, seed=seed, **SHAPE[family]).inputs
        _assert_close(session, qmodel, inputs, OUTPUT[family])


def test_a_float_graph_exports_as_is(tmp_path):
    g = build_model("bert", hidden=32, layers=2)
    path = graph_to_onnx(outlierfx.capture(g.model, g.inputs), tmp_path / "fp32.onnx")
    ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops["QuantizeLinear"] == 0 and ops["DequantizeLinear"] == 0 and ops["MatMul"] >= 12
    with torch.no_grad():
        expected = g.model(**g.inputs).last_hidden_state
    got = OnnxRuntimeModel(path)(**g.inputs).last_hidden_state
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_the_speed_benchmark_runs_fp32_and_int8_in_onnx_runtime():
    from outlierfx.speed import onnx_runtime_candidates

    g, sim, _ = _quantized("bert", backend=None, recipe="smooth-fold+sink")
    fp32, int8 = onnx_runtime_candidates(outlierfx.capture(g.model, g.inputs), sim, "smooth-fold+sink", threads=1)
    assert (fp32.name, int8.name) == ("fp32", "smooth-fold+sink") and fp32.backend == int8.backend == "onnxruntime"
    _assert_close(fp32.model, g.model, g.inputs, "last_hidden_state")
    reference, _ = lower_model(sim, "reference")
    _assert_close(int8.model, reference, g.inputs, "last_hidden_state")


def test_cli_exports_a_saved_folder(tmp_path, capsys):
    g, qmodel, _ = _quantized("llama", backend=outlierfx.default_backend())
    folder = outlierfx.save(qmodel, tmp_path / "int8")
    out = tmp_path / "model.onnx"
    assert main(["export", str(folder), "--format", "onnx", "--out", str(out)]) == 0
    assert "QDQ ONNX" in capsys.readouterr().out
    from_model = OnnxRuntimeModel(outlierfx.export_onnx(qmodel, tmp_path / "direct.onnx"))
    from_folder = OnnxRuntimeModel(out)
    assert torch.equal(from_folder(**g.inputs).logits, from_model(**g.inputs).logits)
    reference, _ = lower_model(pre_lowering(qmodel)[0], "reference")
    _assert_close(from_folder, reference, g.inputs, "logits")
    assert main(["export", str(folder), "--out", str(out)]) == 2  # an existing file needs --force
    assert "exists" in capsys.readouterr().err
    assert main(["export", str(folder), "--out", str(out), "--force"]) == 0
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_grids_qdq_cannot_express_are_refused_with_the_fix(tmp_path):
    g, four_bit_weights, _ = _quantized("bert", recipe="naive", bits="W4A8")  # int8 codes on a narrower grid: fine
    _assert_close(OnnxRuntimeModel(outlierfx.export_onnx(four_bit_weights, tmp_path / "w4.onnx")), four_bit_weights,
                  g.inputs, "last_hidden_state")
    (tmp_path / "w4.onnx").unlink()
    _, six_bit, _ = _quantized("bert", recipe="naive", bits="W8A6")
    with pytest.raises(ExportError, match="codes 0..63 .* QuantizeLinear saturates .* 8-bit activations"):
        outlierfx.export_onnx(six_bit, tmp_path / "a6.onnx")
    _, mixed, _ = _quantized("bert", recipe="mp16")
    with pytest.raises(ExportError, match="more than 8 bits .* export a model with 8-bit activations"):
        outlierfx.export_onnx(mixed, tmp_path / "mp16.onnx")
    _, peg_sink, _ = _quantized("bert", recipe="smooth-peg+sink")  # the accurate preset
    with pytest.raises(ExportError, match="first tokens .* beside per-channel \\(PEG\\) groups.* 'smooth-peg'"):
        outlierfx.export_onnx(peg_sink, tmp_path / "accurate.onnx")
    assert not list(tmp_path.iterdir())


def test_a_causal_lm_quantized_for_generation_is_refused_with_the_fix(tmp_path):
    g = build_model("llama", hidden=32, layers=1)
    qmodel, _ = outlierfx.quantize(g.model, [g.inputs], recipe="naive", progress=False)  # the KV-cache graph
    for source in (qmodel, outlierfx.save(qmodel, tmp_path / "saved")):
        with pytest.raises(ExportError, match="generation=False"):
            outlierfx.export_onnx(source, tmp_path / "llama.onnx")
    assert not (tmp_path / "llama.onnx").exists()


def test_peg_groups_export_as_int8_sub_gemms(tmp_path):
    g, peg, _ = _quantized("bert", recipe="peg")
    session = OnnxRuntimeModel(outlierfx.export_onnx(peg, tmp_path / "peg.onnx"))
    _assert_close(session, peg, g.inputs, "last_hidden_state")
    assert _ort_fused_ops(session.path, tmp_path)["MatMulIntegerToFloat"] > 12  # K sub-GEMMs for grouped inputs


def test_onnx_runtime_model_names_missing_inputs(tmp_path):
    g, qmodel, _ = _quantized("bert")
    session = OnnxRuntimeModel(outlierfx.export_onnx(qmodel, tmp_path / "m.onnx"))
    with pytest.raises(ExportError, match=r"takes inputs \['input_ids', 'attention_mask'\]; missing \['attention_mask'\]"):
        session(input_ids=g.inputs["input_ids"])
    assert isinstance(session(**g.inputs).last_hidden_state, torch.Tensor)
    assert np.isfinite(session(**g.inputs).last_hidden_state.numpy()).all()


@pytest.mark.slow
def test_minilm_in_onnx_runtime_keeps_cosine_999_against_fp32(minilm, tmp_path):
    from outlierfx.benchmarks import CALIBRATION, calibration_batches
    from outlierfx.evaluate import EncoderEval

    qmodel, report = outlierfx.quantize(minilm.model, calibration_batches(minilm, **CALIBRATION["encoder"]),
                                        progress=False)  # the fast preset on this CPU's backend
    session = OnnxRuntimeModel(outlierfx.export_onnx(qmodel, tmp_path / "minilm.onnx"))
    evaluator = EncoderEval.build(minilm, sentences=64)
    embeddings = {"fp32": evaluator.embeddings(minilm.model.eval()), "ort": evaluator.embeddings(session),
                  "ours": evaluator.embeddings(qmodel),
                  "reference": evaluator.embeddings(lower_model(pre_lowering(qmodel)[0], "reference")[0])}

    def cosine(a: str, b: str) -> float:
        return float(torch.nn.functional.cosine_similarity(embeddings[a], embeddings[b]).mean())

    assert cosine("ort", "fp32") >= 0.999  # issue 27's acceptance (measured 0.9992, ours on onednn 0.9992)
    # not bit for bit: any change in float rounding moves MiniLM's codes that sit at a step's edge
    # (ORT's unfused QDQ graph is 0.9997 from both; our onednn is 0.9994 from the reference form)
    assert cosine("ort", "reference") >= 0.9995  # measured 0.9997
    assert cosine("ort", "ours") >= 0.999  # measured 0.9994 against onednn
