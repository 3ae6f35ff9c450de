"""QAT: fake-quant fine-tuning of the Linear weights (the baseline for Quadapter's claim)."""

import pytest
import torch

import outlierfx
from outlierfx.errors import PassError
from outlierfx.graph.compare import masked_mse
from outlierfx.passes import PassManager
from outlierfx.passes.convert_fake_quant import ConvertToFakeQuant
from outlierfx.passes.insert_observers import InsertObservers
from outlierfx.passes.qat import QAT
from outlierfx.passes.training import lm_loss
from outlierfx.quantizers.calibrate import calibrate
from outlierfx.quantizers.policy import make_policy
from outlierfx.testing import OutlierSpec, build_model


def _calibrated(g, policy):
    gm = outlierfx.capture(g.model, g.inputs)
    observed = PassManager([InsertObservers(policy)])(gm).graph_module
    calibrate(observed, [g.inputs], progress=False)
    return observed


@pytest.mark.parametrize(("family", "loss"), [("llama", "lm"), ("bert", "distill")])
def test_qat_lowers_the_training_loss_and_leaves_the_input_untouched(family, loss):
    g = build_model(family, layers=2, outliers=OutlierSpec(gamma_scale=20.0, channels=(3,)), batch=2, seq=12)
    policy = make_policy("full", "W4A8")
    observed = _calibrated(g, policy)
    before = {k: v.clone() for k, v in observed.state_dict().items()}
    result = QAT([g.inputs], policy.weight, policy.embedding, epochs=30, lr=3e-3)(observed)
    plan = result.plan
    assert plan.loss == loss and result.modified
    assert plan.losses[-1] < 0.9 * plan.losses[0], plan.summary()
    assert plan.parameters == sum(w.numel() + (0 if b is None else b.numel()) for w, b in plan.weights.values())
    for k, v in observed.state_dict().items():  # the input graph (and the user's model) kept every tensor
        assert torch.equal(v, before[k]), k
    converted = ConvertToFakeQuant(policy.weight, policy.embedding)
    untrained = converted(observed).graph_module
    trained = converted(result.graph_module).graph_module
    with torch.no_grad():
        if loss == "lm":
            start, end = lm_loss(untrained(**g.inputs), g.inputs), lm_loss(trained(**g.inputs), g.inputs)
        else:
            ref, mask = g.model(**g.inputs), g.inputs["attention_mask"]
            start = masked_mse(untrained(**g.inputs), ref, mask)
            end = masked_mse(trained(**g.inputs), ref, mask)
    # the converted model (weights quantized once, as the training forward did) keeps the gain
    assert float(end) < 0.9 * float(start)


def test_tied_lm_head_stays_frozen_and_qat_needs_calibration():
    g = build_model("llama", layers=1, tied=True)
    policy = make_policy("full", "W8A8")
    plan = QAT([g.inputs], policy.weight, epochs=1)(_calibrated(g, policy)).plan
    assert len(plan.frozen) == 1 and plan.frozen[0] not in plan.weights
    gm = outlierfx.capture(g.model, g.inputs)
    with pytest.raises(PassError, match="calibrated"):
        QAT([g.inputs], policy.weight)(PassManager([InsertObservers(policy)])(gm).graph_module)
    with pytest.raises(ValueError, match="batches"):
        QAT([], policy.weight)


def test_qat_recipe_runs_end_to_end():
    g = build_model("gpt2", layers=1, batch=2, seq=8)
    qmodel, report = outlierfx.quantize(g.model, [g.inputs], recipe="qat", generation=False, progress=False)
    assert [e.pass_name for e in report.audit][-2:] == ["QAT", "ConvertToFakeQuant"]
    with torch.no_grad():
        assert torch.isfinite(qmodel(**g.inputs).logits).all()
