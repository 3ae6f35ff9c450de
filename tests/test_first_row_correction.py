"""GPTQ's first-row corrections (outlierfx/passes/first_row_correction.py): one float vector per
Linear, added to its output at each text's first token."""

import pytest
import torch

import outlierfx
from outlierfx.graph import meta
from outlierfx.graph.attrs import fetch_attr
from outlierfx.graph.first_tokens import first_token_mask
from outlierfx.passes import PassManager
from outlierfx.passes.convert_fake_quant import ConvertToFakeQuant
from outlierfx.passes.first_row_correction import FirstRowError
from outlierfx.passes.gptq import GPTQ
from outlierfx.passes.insert_observers import InsertObservers
from outlierfx.quantizers.calibrate import calibrate
from outlierfx.quantizers.observers import FakeQuantize
from outlierfx.quantizers.policy import make_policy
from outlierfx.testing import OutlierSpec, build_model

SINK = OutlierSpec(gamma_scale=10.0, channels=(3,), first_token_scale=100.0)
"""A massive first token: one id that only position 0 holds, so every text's first rows are alike."""


def _calibrated(model, inputs, policy):
    observed = PassManager([InsertObservers(policy)])(outlierfx.capture(model, inputs)).graph_module
    calibrate(observed, [inputs], progress=False)
    return observed


def _values(gm, inputs):
    """Every node's value in one run of ``gm``."""
    seen = {}

    class Recording(torch.fx.Interpreter):
        def run_node(self, n):
            seen[n.name] = super().run_node(n)
            return seen[n.name]

    with torch.no_grad():
        Recording(gm).run(*(inputs[str(n.target)] for n in gm.graph.nodes if n.op == "placeholder"))
    return seen


@pytest.mark.parametrize("family,sequential", [("llama", False), ("qwen2", True)])
def test_each_corrected_linear_has_no_mean_first_row_error_left_on_the_calibration_texts(family, sequential):
    """Every Linear but the head gets a vector; in the finished graph (the earlier corrections in
    place) each one's first rows then miss the float weight on their unquantized input by nothing
    on average (Qwen2's biases included). The rounded weights are GPTQ's without the option."""
    g = build_model(family, layers=2, hidden=32, ffn=64, batch=4, seq=16, outliers=SINK, tied=False)
    policy = make_policy("linear-inputs", "W4A8")
    observed = _calibrated(g.model, g.inputs, policy)
    before = {k: v.clone() for k, v in observed.state_dict().items()}
    plain = GPTQ([g.inputs], policy.weight, policy.embedding, sequential=sequential)(observed)
    fixed = GPTQ([g.inputs], policy.weight, policy.embedding, sequential=sequential, first_rows=True)(observed)
    assert all(torch.equal(v, before[k]) for k, v in observed.state_dict().items())  # its input left alone
    heads = {r.node for r in fixed.plan.linears if r.module_path.endswith("lm_head")}
    assert heads and set(fixed.plan.first_rows) == {r.node for r in fixed.plan.linears} - heads
    assert f"first-token rows of {len(fixed.plan.first_rows)} Linears corrected" in fixed.plan.summary()
    assert not plain.plan.first_rows and "first-token" not in plain.plan.summary()
    assert all(torch.equal(w, fixed.plan.weights[name]) for name, w in plain.plan.weights.items())

    converted = ConvertToFakeQuant(policy.weight, policy.embedding)(fixed.graph_module).graph_module
    values = _values(converted, g.inputs)
    first = first_token_mask(g.inputs["attention_mask"], None, 1)
    nodes = {n.name: n for n in converted.graph.nodes}
    floats = {n.name: n for n in observed.graph.nodes}
    for name in fixed.plan.first_rows:
        linear = nodes[name]
        (corrected,) = linear.users
        assert corrected.target is torch.ops.aten.addcmul.default
        x = linear.args[0]
        if x.op == "call_module" and isinstance(converted.get_submodule(str(x.target)), FakeQuantize):
            x = x.args[0]
        weight, *bias = (fetch_attr(observed, str(a.target)).detach() for a in floats[name].args[1:3])
        wanted = torch.nn.functional.linear(values[x.name][first], weight, *bias)
        missed = [float((wanted - values[n][first]).mean(0).norm()) for n in (name, corrected.name)]
        assert missed[1] <= 1e-5 * float(wanted.abs().max()) < missed[0], (name, missed)


def test_the_correction_shrinks_by_how_much_the_texts_first_rows_disagree():
    """Positive-part James-Stein: all of the mean where every text errs alike, nothing where the
    mean is within its own noise, ``1 - tr(Sigma) / (n |mean|^2)`` of it in between."""
    alike = FirstRowError()
    alike.add(torch.tensor([[1.0, -2.0]]).repeat(5, 1))
    vector, kept = alike.correction()
    assert kept == pytest.approx(1.0) and torch.allclose(vector.float(), torch.tensor([1.0, -2.0]))

    opposed = FirstRowError()
    opposed.add(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.9, 0.1], [-0.9, -0.1]]))
    assert opposed.correction()[1] == 0.0

    errors = torch.randn(16, 8, generator=torch.Generator().manual_seed(0)) + 0.5
    between = FirstRowError()
    between.add(errors[:10])
    between.add(errors[10:])  # summed over batches as over one
    mean = errors.double().mean(0)
    expected = 1 - float(errors.double().var(0).sum()) / (16 * float(mean.pow(2).sum()))
    vector, kept = between.correction()
    assert 0 < kept < 1 and kept == pytest.approx(expected)
    assert torch.allclose(vector, mean * expected)
    assert FirstRowError().correction() is None


def test_a_graph_without_an_attention_mask_is_rounded_without_corrections_and_says_why():
    g = build_model("llama", layers=1, hidden=32, ffn=64, batch=2, seq=8, outliers=SINK, pad=False)
    inputs = {"input_ids": g.inputs["input_ids"]}
    policy = make_policy("linear-inputs", "W4A8")
    observed = _calibrated(g.model, inputs, policy)
    result = GPTQ([inputs], policy.weight, policy.embedding, first_rows=True)(observed)
    assert result.modified and result.plan.weights and not result.plan.first_rows
    assert "no first-token row corrections: the graph has no attention_mask input" in result.plan.summary()
    assert not any(n.target is torch.ops.aten.addcmul.default for n in result.graph_module.graph.nodes)


def test_the_w4a8_preset_corrects_first_rows_and_its_generating_model_decodes_what_it_scores(tmp_path):
    """The default path below 8-bit weights: GPTQ corrects the first rows of the cache graph (its
    first tokens from the cache's mask and positions); greedy decoding, where no step after the
    prompt has a first token, picks the argmax of the same model's full-sequence logits; the
    saved model loads and generates the same."""
    g = build_model("llama", layers=2, hidden=32, ffn=64, batch=2, seq=8, kv_heads=2, outliers=SINK)
    calibration = [build_model("llama", layers=2, hidden=32, ffn=64, batch=4, seq=12, kv_heads=2, outliers=SINK,
                               seed=seed).inputs for seed in (1, 2)]
    qmodel, report = outlierfx.quantize(g.model, calibration, bits="W4A8", progress=False)
    plan = next(e.plan for e in report.audit.entries if e.pass_name == "GPTQ")
    assert len(plan.first_rows) == 7 * 2 and not plan.first_rows_skipped
    assert report.backend_fit.whole_int8  # the corrections are float adds beside the int8 GEMMs
    prompt = g.inputs["input_ids"][:, :5]
    generated = qmodel.generate(prompt, max_new_tokens=6, eos_token_id=[])
    teacher = qmodel(generated).logits[:, prompt.shape[1] - 1:-1].argmax(-1)
    assert torch.equal(generated[:, prompt.shape[1]:], teacher)
    assert sum(n.target is torch.ops.aten.addcmul.default for n in report.graphs.simulated.graph.nodes) == 7 * 2
    assert report.graphs.simulated.meta.get(meta.GM_CACHE_GRAPH)
    outlierfx.save(qmodel, tmp_path)
    assert torch.equal(outlierfx.load(tmp_path).generate(prompt, max_new_tokens=6, eos_token_id=[]), generated)
