"""LearnRanges: the fine stage (activation ranges learned against the output, LSQ+ style)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import outlierfx
from outlierfx.errors import PassError
from outlierfx.graph.compare import masked_mse
from outlierfx.passes import PassManager
from outlierfx.passes.convert_fake_quant import ConvertToFakeQuant
from outlierfx.passes.group_channels import GroupChannels
from outlierfx.passes.insert_observers import InsertObservers, observers
from outlierfx.passes.learn_ranges import LearnRanges
from outlierfx.recipes import get_recipe
from outlierfx.quantizers.calibrate import calibrate
from outlierfx.quantizers.observers import FakeQuantize, Observer
from outlierfx.quantizers.policy import make_policy
from outlierfx.quantizers.spec import Estimator, Granularity, QuantSpec
from outlierfx.quantizers.trainable import LearnableRange
from outlierfx.testing import OutlierSpec, build_model


def _calibrated(g, *passes):
    gm = outlierfx.capture(g.model, g.inputs)
    gm = PassManager([InsertObservers("full"), *passes])(gm).graph_module
    calibrate(gm, [g.inputs], progress=False)
    return gm


def _outlier_model():
    # enough tokens that the straight-through gradient is mostly signal, not rounding noise
    return build_model("bert", layers=2, batch=8, seq=32, outliers=OutlierSpec(embedding_scale=20.0, channels=(3,)))


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(3, 8), symmetric=st.booleans(), granularity=st.sampled_from(list(Granularity)),
       groups=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_learnable_range_starts_bit_identical_to_the_fake_quantizer(bits, symmetric, granularity, groups, seed):
    gen = torch.Generator().manual_seed(seed)
    data = torch.randn(2, 5, 12, generator=gen) * torch.rand(12, generator=gen).mul(30) + 0.5
    extra = {"groups": groups, "sort_channels": True} if granularity is Granularity.PER_GROUP else {}
    obs = Observer(QuantSpec(bits=bits, symmetric=symmetric, granularity=granularity, **extra))
    obs(data)
    probe = torch.randn(3, 4, 12, generator=gen) * 40
    expected = FakeQuantize.from_observer(obs)(probe)
    learnable = LearnableRange(obs)
    assert torch.equal(learnable(probe), expected)
    # and the learned range, written back, converts to the same quantizer
    lo, hi = learnable.bounds()
    assert torch.equal(FakeQuantize.from_observer(obs.with_learned_range(lo, hi))(probe), expected)


def test_learned_ranges_lower_the_output_error_and_leave_weights_alone():
    g = _outlier_model()
    policy = make_policy("full", "W8A8")
    gm = _calibrated(g, GroupChannels(groups=4))
    before = {k: v.clone() for k, v in g.model.state_dict().items()}
    result = LearnRanges([g.inputs], policy.weight, policy.embedding, steps=60, lr=5e-3, check_every=10)(gm)
    plan = result.plan
    assert result.modified and not plan.kept_start and plan.best_step > 0
    assert plan.loss_end < plan.loss_start * 0.9  # a real improvement, not noise
    learned = observers(result.graph_module)
    assert all(o.spec.estimator is Estimator.LEARNED for o in learned.values())
    grouped = [o for o in learned.values() if o.spec.granularity is Granularity.PER_GROUP]
    assert grouped and all(o.permutation() == observers(gm)[n].permutation()
                           for n, o in learned.items() if o in grouped)  # groups keep their channels
    # the converted model computes what training measured
    with torch.no_grad():
        out = ConvertToFakeQuant(policy.weight, policy.embedding)(result.graph_module).graph_module(**g.inputs)
        ref = g.model(**g.inputs)
    assert float(masked_mse(out, ref, g.inputs["attention_mask"])) == pytest.approx(plan.loss_end, rel=1e-4)
    assert all(torch.equal(before[k], v) for k, v in g.model.state_dict().items())
    assert "learned ranges applied" in plan.summary()


def test_tied_groups_learn_one_pair_per_quantizer():
    g = _outlier_model()
    policy = make_policy("full", "W8A8")
    gm = _calibrated(g, GroupChannels(groups=None))
    plan = LearnRanges([g.inputs], policy.weight, policy.embedding, steps=20, tie_groups=True)(gm).plan
    assert plan.parameters == 2 * len(observers(gm))
    for name, (lo, hi) in plan.ranges.items():  # every group moved by the same fraction of its width
        start_lo, start_hi = observers(gm)[name].range()
        width = (start_hi - start_lo).clamp_min(1e-8)
        shift = (lo - start_lo) / width
        assert torch.allclose(shift, shift.flatten()[0].expand_as(shift), atol=1e-4), name


def test_no_improvement_keeps_the_starting_ranges_and_says_so():
    g = _outlier_model()
    policy = make_policy("full", "W8A8")
    gm = _calibrated(g)
    result = LearnRanges([g.inputs], policy.weight, policy.embedding, steps=2, lr=0.0)(gm)
    assert result.plan.kept_start and not result.modified
    assert "kept the starting ranges" in result.plan.summary()
    start = observers(gm)
    for name, obs in observers(result.graph_module).items():
        assert obs.spec == start[name].spec and torch.equal(obs.qparams()[0], start[name].qparams()[0])


def test_learn_ranges_needs_calibration():
    g = build_model("gpt2", layers=1)
    gm = PassManager([InsertObservers("full")])(outlierfx.capture(g.model, g.inputs)).graph_module
    with pytest.raises(PassError, match="calibrated observers"):
        LearnRanges([g.inputs], None)(gm)


def test_fine_suffix_on_any_recipe_through_the_api():
    assert get_recipe("os+lsq").name == "os+lsq"
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("nope+lsq")
    g = _outlier_model()
    qmodel, report = outlierfx.quantize(g.model, [g.inputs], recipe="peg+lsq", bits="W6A6", progress=False)
    names = [e.pass_name for e in report.audit]
    assert names.index("GroupChannels") < names.index("LearnRanges") < names.index("ConvertToFakeQuant")
    fine = next(e.plan for e in report.audit if e.pass_name == "LearnRanges")
    assert fine.loss_end < fine.loss_start
    assert all(fq.spec.bits == 6 for fq in qmodel.children() if isinstance(fq, FakeQuantize))
