"""FuseAttention: quantizer-free decomposed attention becomes one fused SDPA call."""

import contextlib

import pytest
import torch
from hypothesis import Phase, given, settings

import outlierfx
from outlierfx.graph.compare import output_error, run
from outlierfx.graph.ops import OpKind, op_kind
from outlierfx.passes import PassManager
from outlierfx.passes.fuse_attention import SDPA, FuseAttention
from outlierfx.passes.lower import Lower
from outlierfx.quantizers.observers import FakeQuantize
from outlierfx.testing import build_model, transformer_models


def _quantizer_inputs(gm: torch.fx.GraphModule) -> dict[str, str]:
    """Each quantizer module and the node it reads."""
    return {str(n.target): n.args[0].name for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), FakeQuantize)}


@contextlib.contextmanager
def _quantizers_disabled(*gms: torch.fx.GraphModule):
    """Every FakeQuantize of ``gms`` disabled (pass copies share them), restored after."""
    modules = {id(m): m for gm in gms for m in gm.modules() if isinstance(m, FakeQuantize)}
    states = {key: m.enabled for key, m in modules.items()}
    for m in modules.values():
        m.enabled = False
    try:
        yield
    finally:
        for key, m in modules.items():
            m.enabled = states[key]


def _float_error(before: torch.fx.GraphModule, after: torch.fx.GraphModule, inputs: dict):
    with _quantizers_disabled(before, after):
        return output_error(run(before, ((), inputs)), run(after, ((), inputs)))


def _count(gm: torch.fx.GraphModule, target: object) -> int:
    return sum(1 for n in gm.graph.nodes if n.target is target)


# no shrinking phase: a failing example of these real quantize runs is shown as drawn (shrinking takes minutes)
@settings(max_examples=5, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(g=transformer_models(outliers=False))
def test_linear_inputs_policy_fuses_every_layer_within_tolerance(g):
    qmodel, _ = outlierfx.quantize(g.model, [g.inputs], recipe="naive", bits="W8A8", policy="linear-inputs",
                                   generation=False, progress=False)
    result = PassManager([FuseAttention()])(qmodel)
    entry = result.audit.entries[0]
    plan, fused = entry.plan, result.graph_module
    layers = g.config.num_hidden_layers
    assert len(plan.sites) == len(plan.fused) == layers, plan.summary()
    # exact up to float rounding; with quantizers on, a rounding tie downstream may move a code
    assert _float_error(qmodel, fused, g.inputs).within(FuseAttention.float_rel_tol)
    assert entry.error_vs_previous is not None and entry.error_vs_previous.nonfinite == 0
    assert _count(fused, SDPA) == layers
    assert not any(op_kind(n) in (OpKind.SOFTMAX, OpKind.MATMUL) for n in fused.graph.nodes)
    # quantizers before (q, k, v) and after (context) the chain read what they read before
    assert _quantizer_inputs(fused) == _quantizer_inputs(qmodel)
    assert all(s.mask for s in plan.fused)  # the padded inputs give every layer a mask bias
    head_dim = g.config.hidden_size // g.config.num_attention_heads
    assert all(s.scale == pytest.approx(head_dim ** -0.5)
               for s in plan.fused)


@settings(max_examples=3, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(g=transformer_models(outliers=False))
def test_full_policy_fuses_nowhere_and_says_why(g):
    qmodel, _ = outlierfx.quantize(g.model, [g.inputs], recipe="naive", bits="W8A8", policy="full",
                                   generation=False, progress=False)
    result = FuseAttention()(qmodel)
    plan = result.plan
    assert not result.modified and not plan.fused
    assert len(plan.skipped) == g.config.num_hidden_layers
    for site in plan.skipped:
        assert "quantized inside the chain" in site.reason
        assert len(site.quantizers) == 2  # the scores (before the mask) and the probabilities
        assert site.softmax in plan.summary() and "not fused" in site.describe()
    # disabled quantizers are the identity: the chain then fuses and they leave with it
    for site in plan.skipped:
        for name in site.quantizers:
            qmodel.get_submodule(name).enabled = False
    result = PassManager([FuseAttention()])(qmodel)
    plan = result.audit.entries[0].plan
    assert len(plan.fused) == g.config.num_hidden_layers, plan.summary()
    assert _float_error(qmodel, result.graph_module, g.inputs).within(FuseAttention.float_rel_tol)
    remaining = set(_quantizer_inputs(result.graph_module))
    assert not any(name in remaining for site in plan.fused for name in site.replaced)


def test_fully_masked_rows_match_the_decomposed_graph():
    """Causal attention under left padding: padded queries see no key. The finite mask bias
    gives the uniform average in both forms (SDPA's zeros come only from -inf or bool masks)."""
    g = build_model("llama", layers=2, batch=2, seq=8, kv_heads=2, pad=False)
    inputs = dict(g.inputs)
    inputs["attention_mask"] = inputs["attention_mask"].clone()
    inputs["attention_mask"][0, :3] = 0  # left padding: queries 0-2 of row 0 are fully masked
    gm = outlierfx.capture(g.model, g.inputs)  # (HF's SDPA gives zeros there: capture would refuse)
    fused = FuseAttention()(gm)
    assert len(fused.plan.fused) == 2
    ref, out = run(gm, ((), inputs)), run(fused.graph_module, ((), inputs))
    error = output_error(ref, out)
    assert error.nonfinite == 0 and error.within(FuseAttention.float_rel_tol), error


def test_a_chain_read_elsewhere_is_not_fused():
    g = build_model("bert", layers=1)
    gm = outlierfx.capture(g.model, g.inputs)
    softmax = next(n for n in gm.graph.nodes if op_kind(n) is OpKind.SOFTMAX)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(output):
        extra = gm.graph.call_function(torch.ops.aten.sum.default, (softmax,))
    output.args = ((output.args[0], extra),)
    gm.recompile()
    plan = FuseAttention()(gm).plan
    assert not plan.fused and "read outside the chain" in plan.skipped[0].reason


@pytest.mark.parametrize("backend", ["x86", "reference"])
def test_lower_runs_on_the_fused_graph(backend):
    g = build_model("gpt2", layers=2)
    qmodel, _ = outlierfx.quantize(g.model, [g.inputs], recipe="naive", bits="W8A8", policy="linear-inputs",
                                   generation=False, progress=False)
    fused = FuseAttention()(qmodel).graph_module
    plain, lowered = Lower(backend)(qmodel).graph_module, Lower(backend)(fused).graph_module
    assert _count(lowered, SDPA) == 2
    error = output_error(run(plain, ((), g.inputs)), run(lowered, ((), g.inputs)))
    assert error.nonfinite == 0 and error.within(0.05), error  # a few codes may move at rounding ties


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_grouped_query_attention_reads_the_unexpanded_keys_and_values(family):
    """K and V shared by two query heads each: the fused call reads them unexpanded
    (``enable_gqa``) and transformers' ``repeat_kv`` copies leave the graph, on the prefill graph
    and on the KV-cache graph (where they copied the whole cache every step)."""
    g = build_model(family, layers=2, heads=4, kv_heads=2)
    gm = outlierfx.capture(g.model, g.inputs)
    result = FuseAttention()(gm)
    assert len(result.plan.fused) == 2 and all(s.groups == 2 for s in result.plan.fused), result.plan.summary()
    assert "grouped-query (2 query heads per key/value head)" in result.plan.summary()
    fused = result.graph_module
    calls = [n for n in fused.graph.nodes if n.target is SDPA]
    assert all(n.kwargs.get("enable_gqa") for n in calls)
    head_dim = g.config.hidden_size // g.config.num_attention_heads
    assert all(tuple(n.args[1].meta["val"].shape)[1:] == (2, g.inputs["input_ids"].shape[1], head_dim) for n in calls)
    expand = torch.ops.aten.expand.default  # K's and V's per layer go; the rotary embedding's stays
    assert _count(gm, expand) - _count(fused, expand) == 2 * 2
    error = output_error(run(gm, ((), g.inputs)), run(fused, ((), g.inputs)))
    assert error.nonfinite == 0 and error.within(FuseAttention.float_rel_tol), error

    lm, report = outlierfx.quantize(g.model, [g.inputs], recipe="naive", policy="linear-inputs", backend="onednn",
                                    progress=False)
    fuse = next(e for e in report.audit.entries if e.pass_name == "FuseAttention")
    assert fuse.plan.fused and all(s.groups == 2 for s in fuse.plan.fused)
    prompt = g.inputs["input_ids"][1:, :4]
    tokens = lm.generate(prompt, max_new_tokens=4)
    assert torch.equal(tokens[:, 5:], lm(tokens[:, :-1]).logits[:, 4:].argmax(-1)[:, :3])
