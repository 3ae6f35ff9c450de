"""Lowering fake-quant graphs to integer kernels: per-op numerics on every backend, PEG as
grouped GEMMs, the compiled path, and size on disk (save/load: tests/test_serialize.py)."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import outlierfx
from outlierfx.errors import PassError
from outlierfx.graph import meta
from outlierfx.graph.attrs import fetch_attr
from outlierfx.graph.compare import output_error
from outlierfx.graph.ops import OpKind, op_kind
from outlierfx.passes.fuse_attention import FuseAttention
from outlierfx.passes.lower import Lower
from outlierfx.backends import BackendError, Fallback, FirstTokens, KernelKind, PostOp, check_backend
from outlierfx.backends.int8_linear import QuantizedLinear
from outlierfx.backends.runtime import bf16_attention, mask_or_none
from outlierfx.quantizers.observers import FakeQuantize
from outlierfx.serialize import TENSORS_FILE, size_on_disk_mb
from outlierfx.testing import assert_tokens_close, build_model, first_token_grids_everywhere, transformer_models
from outlierfx.testing.lowering import assert_int8_linears_within_one_step, quantized_linears

ENGINES = tuple(e for e in ("fbgemm", "x86", "qnnpack", "onednn") if e in torch.backends.quantized.supported_engines)


@settings(max_examples=6)
@given(g=transformer_models(outliers=False))
def test_int8_linears_match_fake_quant_within_one_step_on_every_engine(g):
    qmodel, _ = outlierfx.quantize(g.model, [g.inputs], recipe="naive", bits="W8A8", generation=False, progress=False)
    for engine in ENGINES:
        result = Lower(engine)(qmodel)
        plan = result.plan
        assert result.modified and plan.backend == engine
        int8 = [lin for lin in plan.linears if lin.is_int8]
        # every Linear whose input is quantized runs in int8 (qnnpack: those with an int8 output)
        assert len(int8) == len(quantized_linears(result.graph_module)) > 0
        if engine != "qnnpack":
            assert len(int8) == len(plan.linears)
        assert_int8_linears_within_one_step(result.graph_module, g.inputs)


@pytest.mark.skipif("onednn" not in torch.backends.quantized.supported_engines, reason="no onednn engine")
@pytest.mark.parametrize("policy", ["full", "linear-inputs"])
def test_onednn_fuses_gelu_into_the_int8_gemm_and_matches_the_reference_form(policy):
    g = build_model("bert", hidden=32, layers=2)
    qmodel, _ = outlierfx.quantize(g.model, [g.inputs], recipe="naive", bits="W8A8", policy=policy, progress=False)
    result = Lower("onednn")(qmodel)
    fused = [m for m in quantized_linears(result.graph_module).values() if m.gelu is not None]
    planned = [lin for lin in result.plan.linears if PostOp.GELU in lin.kernel.post_ops]
    if policy == "full":  # the GELU input is quantized: nothing to fuse
        assert not fused and not planned
    else:
        assert len(fused) == len(planned) == 2  # one intermediate dense per layer
        # GELU, then requantized: the next GEMM reads the plain codes
        assert all(m.out_qparams is not None and m.codes_out for m in fused)
        gelus = [n for n in result.graph_module.graph.nodes if n.target is torch.ops.aten.gelu.default]
        assert not gelus
    assert_int8_linears_within_one_step(result.graph_module, g.inputs)
    assert_tokens_close(Lower("reference")(qmodel).graph_module, result.graph_module, g.inputs)


@pytest.mark.skipif("onednn" not in torch.backends.quantized.supported_engines, reason="no onednn engine")
@pytest.mark.parametrize(("family", "recipe"), [("bert", "naive"), ("llama", "naive"), ("llama", "naive+sink")])
def test_onednn_adds_the_residual_inside_the_int8_gemm_and_matches_the_reference_form(family, recipe,
                                                                                     every_first_token_grid):
    g = build_model(family, hidden=32, layers=2)
    qmodel, _ = outlierfx.quantize(g.model, [g.inputs], recipe=recipe, bits="W8A8", policy="linear-inputs",
                                   generation=False, progress=False)
    result = Lower("onednn")(qmodel)
    fused = [m for m in quantized_linears(result.graph_module).values() if m.residual]
    planned = [lin for lin in result.plan.linears if PostOp.RESIDUAL_ADD in lin.kernel.post_ops]
    assert len(fused) == len(planned) == 4  # attention output and FFN output, per layer
    if recipe.endswith("+sink"):
        assert all(m.sink is not None for m in fused)
    lowered_adds = sum(n.target is torch.ops.aten.add.Tensor for n in result.graph_module.graph.nodes)
    reference = Lower("reference")(qmodel).graph_module
    assert lowered_adds <= sum(n.target is torch.ops.aten.add.Tensor for n in reference.graph.nodes) - 4
    assert_int8_linears_within_one_step(result.graph_module, g.inputs)
    assert_tokens_close(reference, result.graph_module, g.inputs)


@pytest.mark.skipif("onednn" not in torch.backends.quantized.supported_engines, reason="no onednn engine")
@pytest.mark.parametrize(("family", "merged_per_layer"), [("bert", 3), ("llama", 5)])
def test_onednn_runs_linears_that_read_one_input_as_one_gemm(family, merged_per_layer):
    # BERT: Q, K, V; Llama: Q, K, V and gate, up (float outputs, nothing fused after them)
    g = build_model(family, hidden=32, layers=2)
    qmodel, _ = outlierfx.quantize(g.model, [g.inputs], recipe="naive", bits="W8A8", policy="linear-inputs",
                                   generation=False, progress=False)
    result = Lower("onednn")(qmodel)
    layers = g.config.num_hidden_layers
    noted = [lin for lin in result.plan.linears if lin.kernel.merged_with]
    assert len(noted) == merged_per_layer * layers
    groups = 2 if family == "llama" else 1
    modules = quantized_linears(result.graph_module)
    assert len(modules) == len(result.plan.linears) - (merged_per_layer - groups) * layers
    assert len({id(m) for m in result.graph_module.modules() if isinstance(m, QuantizedLinear)}) == len(modules)
    # a merged GEMM holds its parts' int8 rows as they are (stacked only while packed)
    assert all(m.row_blocks == 3 for m in modules.values() if m.out_features == 3 * g.config.hidden_size)
    assert_int8_linears_within_one_step(result.graph_module, g.inputs)
    assert_tokens_close(Lower("reference")(qmodel).graph_module, result.graph_module, g.inputs)


@pytest.mark.parametrize("engine", [e for e in ENGINES if e != "qnnpack"])  # float outputs
def test_a_weight_given_as_row_blocks_runs_as_its_stacked_weight_bit_for_bit(engine):
    torch.manual_seed(0)
    blocks = [torch.randint(-127, 128, (rows, 24), dtype=torch.int8) for rows in (16, 8, 8)]
    scale = torch.rand(32, dtype=torch.float64) / 50 + 1e-3
    bias = torch.randn(32)
    sink = (1, 0.2, 120) if engine == "onednn" else None  # the first row's closed-form correction reads the row sums
    args = (scale, bias, (0.05, 128, 0, 255), None, engine)
    stacked = QuantizedLinear(torch.cat(blocks), *args, sink=sink)
    merged = QuantizedLinear(blocks, *args, sink=sink)
    assert merged.row_blocks == 3 and (merged.out_features, merged.in_features) == (32, 24)
    assert all(a is b for a, b in zip(merged.weight_blocks(), blocks))  # held as given, not stacked
    assert torch.equal(merged.int8_weight(), stacked.int8_weight())
    x = torch.randn(2, 8, 24)
    with torch.no_grad():
        want = stacked(x)
        assert torch.equal(merged(x), want)
        assert torch.equal(copy.deepcopy(merged)(x), want)  # packed again from the blocks
    with pytest.raises(ValueError, match="one width"):
        QuantizedLinear([blocks[0], blocks[1][:, :12]], *args)


@pytest.mark.parametrize("engine", [e for e in ("onednn", "x86") if e in ENGINES])
def test_fused_attention_skips_an_all_zero_mask_once_per_forward(engine):
    g = build_model("bert", hidden=32, layers=2)
    qmodel, _ = outlierfx.quantize(g.model, [g.inputs], recipe="naive", bits="W8A8", policy="linear-inputs",
                                   progress=False)
    fused = FuseAttention()(qmodel).graph_module
    lowered = Lower(engine)(fused).graph_module
    checks = [n for n in lowered.graph.nodes if n.target is mask_or_none]
    attention = [n for n in lowered.graph.nodes
                 if n.target in (torch.ops.aten.scaled_dot_product_attention.default, bf16_attention)]
    assert len(checks) == 1 and len(attention) == g.config.num_hidden_layers
    assert all(n.kwargs["attn_mask"] is checks[0] for n in attention)
    reference = Lower("reference")(fused).graph_module
    padded = dict(g.inputs, attention_mask=torch.ones_like(g.inputs["attention_mask"]))
    padded["attention_mask"][0, -3:] = 0
    for inputs in (dict(g.inputs, attention_mask=torch.ones_like(g.inputs["attention_mask"])), padded):
        assert_tokens_close(reference, lowered, inputs)
    assert mask_or_none(torch.zeros(2, 1, 1, 8)) is None
    bias = torch.zeros(2, 1, 1, 8)
    bias[1, 0, 0, -1] = torch.finfo(torch.float32).min
    assert mask_or_none(bias) is bias


@pytest.mark.skipif("onednn" not in torch.backends.quantized.supported_engines, reason="no onednn engine")
def test_fused_residual_is_read_densely_and_broadcasts_fall_back_outside_the_kernel():
    torch.manual_seed(0)
    weight = torch.randint(-127, 128, (16, 24), dtype=torch.int8)
    scale = torch.rand(16, dtype=torch.float64) / 50 + 1e-3
    bias = torch.randn(16)
    module = QuantizedLinear(weight, scale, bias, (0.05, 128, 0, 255), None, "onednn", residual=True)
    plain = QuantizedLinear(weight, scale, bias, (0.05, 128, 0, 255), None, "onednn")
    x = torch.randn(2, 8, 24)
    strided = torch.randn(8, 2, 16).transpose(0, 1)  # not contiguous: the kernel must not see it as is
    row = torch.randn(16)  # broadcast over tokens
    with torch.no_grad():
        for residual in (strided, row, strided.contiguous()):
            torch.testing.assert_close(module(x, residual), plain(x) + residual, rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="residual"):
            module(x)


@settings(max_examples=6)
@given(g=transformer_models())
def test_reference_form_equals_fake_quant(g):
    qmodel, _ = outlierfx.quantize(g.model, [g.inputs], recipe="naive", bits="W8A8", generation=False, progress=False)
    lowered = Lower("reference")(qmodel).graph_module
    assert not any(isinstance(m, FakeQuantize) for m in lowered.modules())
    with torch.no_grad():
        error = output_error(qmodel(**g.inputs), lowered(**g.inputs))
    assert error.within(1e-5)


@settings(max_examples=6)
@given(g=transformer_models(outliers=True), policy=st.sampled_from(["full", "linear-inputs"]))
def test_reference_form_carries_first_token_grids_exactly(g, policy):
    """+sink: the first rows run beside the main graph on their own grid; nothing stays simulated."""
    with first_token_grids_everywhere():
        qmodel, _ = outlierfx.quantize(g.model, [g.inputs], recipe="naive+sink", bits="W8A8", policy=policy,
                                       generation=False, progress=False)
    two_grids = [m for m in qmodel.modules() if isinstance(m, FakeQuantize) and m.has_sink_grid]
    assert two_grids, "no quantizer has a first-token grid"
    result = Lower("reference")(qmodel)
    assert not result.plan.simulated
    lowered = result.graph_module
    assert not any(isinstance(m, FakeQuantize) for m in lowered.modules())
    gemms = [n for n in lowered.graph.nodes if n.target is torch.ops.aten.linear.default]
    quantized = [lin for lin in result.plan.linears if lin.kernel.first_tokens is FirstTokens.SECOND_GEMM]
    assert quantized and len(gemms) > len(result.plan.linears)  # GEMMs over the first rows too
    with torch.no_grad():
        error = output_error(qmodel(**g.inputs), lowered(**g.inputs))
    assert error.within(1e-5)


@pytest.mark.parametrize(("family", "recipe"), [("bert", "peg"), ("llama", "peg"), ("bert", "best")])
def test_peg_linears_become_grouped_int8_gemms_equal_to_fake_quant(family, recipe):
    # best: range-sized groups on every Linear input, MSE-clipped weight rows
    g = build_model(family, hidden=32, layers=2)
    qmodel, _ = outlierfx.quantize(g.model, [g.inputs], recipe=recipe, bits="W8A8", generation=False, progress=False)
    result = Lower("reference")(qmodel)
    grouped = [lin for lin in result.plan.linears if lin.kernel.kind is KernelKind.INT8_SUB_GEMMS]
    assert grouped, result.plan.summary()
    with torch.no_grad():
        error = output_error(qmodel(**g.inputs), result.graph_module(**g.inputs))
    assert error.within(1e-5)  # only the float summation order differs
    # the permutation is folded into weight columns: one gather per grouped input, no scatter
    gathers = [n for n in result.graph_module.graph.nodes if n.target is torch.ops.aten.index_select.default]
    assert len(gathers) == len(grouped)
    x86 = Lower("x86")(qmodel).graph_module
    assert_int8_linears_within_one_step(x86, g.inputs)
    # more groups than max_sub_gemms: one float GEMM on the int8 weights, same numerics
    fallback = Lower("reference", max_sub_gemms=4)(qmodel)
    assert not any(lin.kernel.kind is KernelKind.INT8_SUB_GEMMS for lin in fallback.plan.linears)
    too_many = [lin.kernel for lin in fallback.plan.linears if lin.kernel.fallback is Fallback.TOO_MANY_GROUPS]
    assert too_many and all(k.kind is KernelKind.FLOAT_GEMM_INT8_WEIGHTS and k.groups > 4 for k in too_many)
    with torch.no_grad():
        assert output_error(qmodel(**g.inputs), fallback.graph_module(**g.inputs)).within(1e-5)


def test_k1_groups_lower_exactly_like_per_tensor():
    from outlierfx.passes import GroupChannels
    from outlierfx.recipes import Recipe, step

    g = build_model("gpt2", hidden=16, layers=1)
    k1 = Recipe("k1", "test", observe=(step(GroupChannels, groups=1),))
    qmodel, _ = outlierfx.quantize(g.model, [g.inputs], recipe=k1, bits="W8A8", generation=False, progress=False)
    naive, _ = outlierfx.quantize(g.model, [g.inputs], recipe="naive", bits="W8A8", generation=False, progress=False)
    assert [lin.kernel for lin in Lower("x86")(qmodel).plan.linears] == \
        [lin.kernel for lin in Lower("x86")(naive).plan.linears]
    lowered = Lower("reference")(qmodel).graph_module
    assert not any(n.target is torch.ops.aten.index_select.default for n in lowered.graph.nodes)
    with torch.no_grad():
        assert output_error(naive(**g.inputs), lowered(**g.inputs)).within(1e-6)


def test_a_linear_with_more_groups_than_pay_off_runs_as_a_float_gemm():
    from outlierfx.backends import MAX_SUB_GEMMS
    from outlierfx.passes.group_channels import CHANNEL_ROLES, GroupChannels
    from outlierfx.recipes import Recipe, step

    g = build_model("bert", hidden=96, heads=4, ffn=128, layers=1)
    per_channel = Recipe("per-channel", "test", observe=(step(GroupChannels, groups=None, roles=CHANNEL_ROLES),))
    qmodel, report = outlierfx.quantize(g.model, [g.inputs], recipe=per_channel, bits="W8A8", progress=False)
    assert {k for _, k, _ in report.audit.entries[-1].plan.grouped} == {96, 128}  # K = each tensor's channels
    result = Lower("reference")(qmodel)
    kernels = [lin.kernel for lin in result.plan.linears]
    assert 96 > MAX_SUB_GEMMS and all(k.kind is KernelKind.FLOAT_GEMM_INT8_WEIGHTS and k.fallback is
                                      Fallback.TOO_MANY_GROUPS and k.groups in (96, 128) for k in kernels), kernels
    with torch.no_grad():
        assert output_error(qmodel(**g.inputs), result.graph_module(**g.inputs)).within(1e-5)
        x86 = Lower("x86")(qmodel).graph_module
        assert output_error(qmodel(**g.inputs), x86(**g.inputs), g.inputs["attention_mask"]).within(0.05)


def test_bad_inputs_are_named():
    g = build_model("gpt2", hidden=16, layers=1)
    gm = outlierfx.capture(g.model, g.inputs)
    with pytest.raises(PassError, match="no fake quantizers"):
        Lower("x86")(gm)
    with pytest.raises(BackendError, match="unknown backend"):
        check_backend("tensorrt")
    weight = torch.zeros(4, 4, dtype=torch.int8)
    with pytest.raises(BackendError, match="fused GELU"):
        QuantizedLinear(weight, torch.ones(4), None, (0.1, 128, 0, 255), (0.1, 128), "onednn", gelu="sigmoid")
    with pytest.raises(BackendError, match="fused GELU"):
        QuantizedLinear(weight, torch.ones(4), None, (0.1, 128, 0, 255), None, "x86", gelu="none")


def test_default_backend_is_onednn_only_with_int8_instructions(monkeypatch):
    from outlierfx.backends import registry

    monkeypatch.setattr(registry, "has_int8_instructions", lambda: True)
    if "onednn" in torch.backends.quantized.supported_engines:
        assert registry.default_backend() == "onednn"
    monkeypatch.setattr(registry, "has_int8_instructions", lambda: False)
    assert registry.default_backend() in ("x86", "qnnpack")


def test_compiled_int8_matches_the_reference_form():
    from outlierfx.passes.lower import compile_int8

    g = build_model("bert", hidden=32, layers=2)
    qmodel, _ = outlierfx.quantize(g.model, [g.inputs], recipe="naive", bits="W8A8", progress=False)
    assert_tokens_close(Lower("reference")(qmodel).graph_module, compile_int8(qmodel), g.inputs)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_compiled_first_token_grids_run_as_int8_gemms(family, every_first_token_grid):
    """A Linear reading a first-token-grid input compiles to an int8 GEMM over all rows and one
    over the first rows: inductor prepacks every int8 weight, none runs in float."""
    from torch._dynamo.utils import counters

    from outlierfx.passes.lower import compile_int8

    g = build_model(family, hidden=32, layers=2)
    qmodel, _ = outlierfx.quantize(g.model, [g.inputs], recipe="naive+sink", bits="W8A8", policy="linear-inputs",
                                   generation=False, progress=False)
    result = Lower("inductor")(qmodel)
    assert not result.plan.simulated
    gemms = [n for n in result.graph_module.graph.nodes if n.target is torch.ops.aten.linear.default
             and n.args[1].target is torch.ops.quantized_decomposed.dequantize_per_channel.default]
    first_rows = len(gemms) - len(result.plan.linears)
    assert first_rows >= 2 * 2, "each layer's QKV and FFN-in GEMMs also run on the first rows"
    counters.clear()
    compiled = compile_int8(qmodel)
    assert_tokens_close(Lower("reference")(qmodel).graph_module, compiled, g.inputs)
    assert counters["inductor"]["qlinear_weight_prepack_matcher_count"] == len(gemms)


def test_compiled_shared_layers_run_every_gemm_in_int8():
    """ALBERT's layers share their weights: each GEMM reading a shared int8 weight gets its own
    dequantize (else CSE merges them and inductor runs every reader as a float GEMM)."""
    from torch._dynamo.utils import counters

    from outlierfx.passes.lower import lower_model
    from outlierfx.testing.architectures import build_architecture
    from outlierfx.testing.lowering import reference_gemms

    g = build_architecture("albert")
    qmodel, _ = outlierfx.quantize(g.model, [g.inputs], recipe="naive", policy="linear-inputs", progress=False)
    torch._dynamo.reset()
    compiled, _ = lower_model(qmodel, "inductor", bf16_attention=False)
    counters.clear()
    assert_tokens_close(qmodel, compiled, g.inputs)
    codes = [str(n.args[1].args[0].target) for n in reference_gemms(compiled.reference)]
    assert len(set(codes)) == len(codes) and any(c.endswith("_copy") for c in codes)
    assert counters["inductor"]["qlinear_weight_prepack_matcher_count"] == len(codes)


def _bert_with_gelu_output_grids_only():
    """MiniLM's case on a generated BERT (naive+sink, linear-inputs): only the GELU outputs keep
    a first-token grid. Returns the model and the number of grids kept."""
    g = build_model("bert", hidden=32, layers=2)
    with first_token_grids_everywhere():
        qmodel, _ = outlierfx.quantize(g.model, [g.inputs], recipe="naive+sink", bits="W8A8",
                                       policy="linear-inputs", progress=False)
    kept = 0
    for node in qmodel.graph.nodes:
        module = qmodel.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, FakeQuantize) and module.has_sink_grid:
            if node.args[0].target is torch.ops.aten.gelu.default:
                kept += 1
            else:
                module.sink_scale = torch.empty(0)
    return g, qmodel, kept


def test_a_first_token_grid_after_gelu_recomputes_its_rows_so_the_gemm_keeps_its_fusion():
    """The reference form gets the GELU outputs' first rows from a GEMM over the FFN input's
    first rows, so each GELU keeps one reader (inductor fuses GELU and quantize into the int8
    GEMM) and the outputs stay exact."""
    from torch._dynamo.utils import counters

    from outlierfx.passes.lower import compile_int8

    g, qmodel, kept = _bert_with_gelu_output_grids_only()
    assert kept == 2  # one per layer
    result = Lower("reference")(qmodel)
    lowered = result.graph_module
    gelus = [n for n in lowered.graph.nodes if n.target is torch.ops.aten.gelu.default]
    assert len(gelus) == 2 * kept and all(len(n.users) == 1 for n in gelus)  # main + first rows, one reader each
    gemms = [n for n in lowered.graph.nodes if n.target is torch.ops.aten.linear.default]
    # the FFN-in first rows, and the FFN-out first rows that read them
    assert len(gemms) == len(result.plan.linears) + 2 * kept
    with torch.no_grad():
        assert output_error(qmodel(**g.inputs), lowered(**g.inputs)).within(1e-5)
    counters.clear()
    compiled = compile_int8(qmodel)
    assert_tokens_close(lowered, compiled, g.inputs)
    compiled_gemms = [n for n in compiled.reference.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert len(compiled_gemms) == len(gemms) - 2 * kept  # Q, K and V of each layer run as one GEMM there
    assert counters["inductor"]["qlinear_weight_prepack_matcher_count"] == len(compiled_gemms)


@pytest.mark.slow
def test_minilm_lowered_keeps_quality_and_is_under_a_third_of_the_size(minilm, tmp_path):
    from outlierfx.benchmarks import CALIBRATION, calibration_batches
    from outlierfx.evaluate import EncoderEval

    batches = calibration_batches(minilm, **CALIBRATION["encoder"])[:4]
    qmodel, _ = outlierfx.quantize(minilm.model, batches, recipe="peg", bits="W8A8", progress=False)
    lowered = Lower("x86")(qmodel).graph_module
    evaluator = EncoderEval.build(minilm, sentences=32)
    reference = evaluator.embeddings(minilm.model)
    fake = evaluator.metrics(qmodel, reference)["cosine"]
    real = evaluator.metrics(lowered, reference)["cosine"]
    assert real >= fake - 0.002, (fake, real)
    path = outlierfx.save(lowered, tmp_path / "minilm-int8") / TENSORS_FILE
    fp32 = tmp_path / "fp32.pt"
    torch.save(minilm.model.state_dict(), fp32)
    assert size_on_disk_mb(path) <= 0.3 * size_on_disk_mb(fp32)


def test_a_tied_embedding_and_lm_head_share_one_int8_table(tmp_path):
    g = build_model("llama", hidden=32, layers=1, vocab=96, tied=True)
    qmodel, _ = outlierfx.quantize(g.model, [g.inputs], recipe="naive", bits="W8A8", generation=False, progress=False)
    for backend in ("reference", "x86"):
        lowered = Lower(backend)(qmodel).graph_module
        tables = {t.untyped_storage().data_ptr() for t in lowered.state_dict().values()
                  if t.dtype == torch.int8 and tuple(t.shape) == (96, 32)}
        assert len(tables) == 1, backend


@pytest.mark.parametrize("recipe", ["naive", "naive+gptq"])
@pytest.mark.parametrize("tied", [True, False])
def test_the_lm_head_keeps_8_bit_weights_at_w4a8(tied, recipe):
    """Below 8 bits the output head stays at 8 (its error lands on every logit), as tables do;
    tied, it reads the int8 table itself (one stored tensor, no int4 copy); GPTQ rounds it on
    the same 8-bit grid. The other Linears are int4."""
    g = build_model("llama", hidden=32, layers=1, vocab=96, tied=tied)
    gm, report = outlierfx.quantize(g.model, [g.inputs], recipe=recipe, bits="W4A8", generation=False, progress=False)
    linears = [n for n in gm.graph.nodes if op_kind(n) is OpKind.LINEAR]
    head, table = linears[-1], next(n for n in gm.graph.nodes if op_kind(n) is OpKind.EMBEDDING)
    assert head.meta[meta.WEIGHT_QUANT].bits == 8 and table.meta[meta.WEIGHT_QUANT].bits == 8
    assert {n.meta[meta.WEIGHT_QUANT].bits for n in linears[:-1]} == {4}
    weights = [fetch_attr(gm, str(n.target)) for n in (head.args[1], table.args[0])]
    assert (weights[0].data_ptr() == weights[1].data_ptr()) is tied  # one stored tensor for both readers
    levels = max(len(torch.unique(row)) for row in weights[0])
    assert levels > 16, levels  # on an 8-bit grid, not rounded to int4 by GPTQ or conversion
    assert "output head" in report.to_text() or tied


@pytest.mark.skipif("onednn" not in torch.backends.quantized.supported_engines, reason="no onednn engine")
def test_onednn_requantizes_to_a_first_token_output_grid_inside_the_gelu_gemm():
    """MiniLM's case on onednn: a single-grid FFN input, a first-token grid on the GELU output.
    The GEMM fuses GELU and requantization to both grids (a batch x n GEMM for the first rows);
    the FFN output GEMM reads the two-grid codes as they are: no float GELU output is written."""
    g, qmodel, kept = _bert_with_gelu_output_grids_only()
    result = Lower("onednn")(qmodel)
    planned = [lin for lin in result.plan.linears if lin.kernel.first_tokens is FirstTokens.OUTPUT_GRID]
    modules = [m for m in quantized_linears(result.graph_module).values() if m.sink_out is not None]
    assert len(planned) == len(modules) == kept == 2 and all(m.gelu is not None and m.sink is None for m in modules)
    assert not [n for n in result.graph_module.graph.nodes if n.target is torch.ops.aten.gelu.default]
    assert_int8_linears_within_one_step(result.graph_module, g.inputs)
    assert_tokens_close(Lower("reference")(qmodel).graph_module, result.graph_module, g.inputs)


@pytest.mark.skipif("onednn" not in torch.backends.quantized.supported_engines, reason="no onednn engine")
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_onednn_runs_attention_in_bf16_where_int8_gemms_write_q_k_v(family):
    g, fused = _fused_attention_model(family)
    result = Lower("onednn", bf16_attention=True)(fused)
    lowered = result.graph_module
    assert result.plan.bf16_attention and "bfloat16" in result.plan.summary()
    bf16 = [n for n in lowered.graph.nodes if n.target is bf16_attention]
    writers = [m for m in quantized_linears(lowered).values() if m.out_dtype == torch.bfloat16]
    if family == "bert":  # Q, K, V: one merged GEMM per layer, read through views only
        assert len(bf16) == len(writers) == g.config.num_hidden_layers
    else:  # rotary embeddings sit between the Q/K GEMMs and attention: stays float
        assert not bf16 and not writers
    _assert_close_to_reference_with_and_without_padding(g, fused, lowered)
    off = Lower("onednn", bf16_attention=False)(fused)
    assert not off.plan.bf16_attention and not any(n.target is bf16_attention for n in off.graph_module.graph.nodes)
    with pytest.raises(BackendError, match="needs the inductor or onednn backend, not x86"):
        Lower("x86", bf16_attention=True)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_inductor_merges_q_k_v_and_runs_attention_in_bf16(family):
    """The compiled form: Q, K and V (GEMMs on one input that only attention reads) run as one
    int8 GEMM on their stacked weights; it takes input, weight and bias in bfloat16 (inductor
    folds the casts into its int8 GEMM, every weight still prepacked) and attention runs in bf16.
    On Llama the rotary embedding sits between: nothing merges, attention stays float."""
    from torch._dynamo.utils import counters

    from outlierfx.backends.inductor import CompiledInt8

    g, fused = _fused_attention_model(family)
    result = Lower("inductor", bf16_attention=True)(fused)
    lowered = result.graph_module
    bf16 = [n for n in lowered.graph.nodes if n.target is bf16_attention]
    gemms = [n for n in lowered.graph.nodes if n.target is torch.ops.aten.linear.default]
    writers = [n for n in gemms if n.args[0].target is torch.ops.aten._to_copy.default]
    merged = [lin for lin in result.plan.linears if lin.kernel.merged_with == 2]
    layers = g.config.num_hidden_layers
    if family == "bert":
        assert len(bf16) == len(writers) == layers and len(merged) == 3 * layers
        assert len(gemms) == len(result.plan.linears) - 2 * layers
        assert all(all(a.kwargs["dtype"] is torch.bfloat16 for a in n.args) for n in writers)
    else:
        assert not bf16 and not writers and not merged and len(gemms) == len(result.plan.linears)
    _assert_close_to_reference_with_and_without_padding(g, fused, lowered)
    counters.clear()
    compiled = CompiledInt8(lowered)
    _assert_close_to_reference_with_and_without_padding(g, fused, compiled)
    assert counters["inductor"]["qlinear_weight_prepack_matcher_count"] == len(gemms)
    off = Lower("inductor", bf16_attention=False)(fused).graph_module
    assert not any(n.target is bf16_attention for n in off.graph.nodes)
    with torch.no_grad():  # the merge alone is exact
        assert torch.equal(Lower("reference")(fused).graph_module(**g.inputs)[0], off(**g.inputs)[0])


def _fused_attention_model(family):
    g = build_model(family, hidden=32, layers=2)
    qmodel, _ = outlierfx.quantize(g.model, [g.inputs], recipe="naive", bits="W8A8", policy="linear-inputs",
                                   generation=False, progress=False)
    return g, FuseAttention()(qmodel).graph_module


def _assert_close_to_reference_with_and_without_padding(g, fused, lowered):
    padded = dict(g.inputs, attention_mask=torch.ones_like(g.inputs["attention_mask"]))
    padded["attention_mask"][0, -3:] = 0
    reference = Lower("reference")(fused).graph_module
    for inputs in (g.inputs, padded):
        assert_tokens_close(reference, lowered, inputs)
