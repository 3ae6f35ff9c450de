"""PEG (GroupChannels) and token-wise clipping (ClipTokenwise)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import outlierfx
from outlierfx.errors import PassError
from outlierfx.graph.roles import Role
from outlierfx.passes import PassManager
from outlierfx.passes.clip_tokenwise import ClipTokenwise
from outlierfx.passes.convert_fake_quant import ConvertToFakeQuant
from outlierfx.passes.group_channels import GroupChannels
from outlierfx.passes.insert_observers import InsertObservers, observers
from outlierfx.quantizers.calibrate import calibrate
from outlierfx.quantizers.fake_quant import group_index
from outlierfx.quantizers.observers import Observer
from outlierfx.quantizers.policy import make_policy
from outlierfx.quantizers.spec import Granularity, QuantSpec
from outlierfx.testing import OutlierSpec, build_model


def _observed(g, *passes):
    gm = outlierfx.capture(g.model, g.inputs)
    return PassManager([InsertObservers("full"), *passes])(gm).graph_module


def test_group_channels_targets_the_residual_stream_tensors():
    g = build_model("bert", layers=2, outliers=OutlierSpec(embedding_scale=50.0, channels=(3,)))
    result = GroupChannels(groups=4)(_observed(g))
    assert result.modified
    roles = [t.roles for t in result.plan.tensors]
    # per block: the FFN input (an LN output in BERT), the FFN output and two residual sums
    assert len(roles) == 2 * 4
    assert sum(Role.RESIDUAL_SUM in r for r in roles) == 4
    assert sum(Role.FFN_INPUT in r for r in roles) == sum(Role.FFN_OUTPUT in r for r in roles) == 2
    specs = [getattr(result.graph_module, t.observer).spec for t in result.plan.tensors]
    assert all(s.granularity is Granularity.PER_GROUP and s.groups == 4 and s.sort_channels for s in specs)


def test_group_channels_skips_excluded_roles():
    """roles={LINEAR_INPUT} minus NORM_OUTPUT: the Linear inputs no norm produces (attention
    context, SwiGLU output, the LM head's slice), every other observer keeps its spec."""
    g = build_model("llama", layers=2)
    observed = _observed(g)
    result = GroupChannels(groups=4, roles=frozenset({Role.LINEAR_INPUT}),
                           exclude_roles=frozenset({Role.NORM_OUTPUT}))(observed)
    chosen = {t.observer for t in result.plan.tensors}
    assert len(chosen) == 2 * 2 + 1
    for name, module in observed.named_children():
        if not isinstance(module, Observer):
            continue
        wanted = Role.LINEAR_INPUT in module.roles and Role.NORM_OUTPUT not in module.roles
        assert (name in chosen) == wanted
        granularity = getattr(result.graph_module, name).spec.granularity
        assert (granularity is Granularity.PER_GROUP) == wanted


def test_peg_with_one_group_is_exactly_per_tensor():
    g = build_model("llama", layers=1)
    policy = make_policy("full", "W8A8")
    outs = []
    for extra in ([], [GroupChannels(groups=1)]):
        gm = _observed(g, *extra)
        calibrate(gm, [g.inputs], progress=False)
        q = ConvertToFakeQuant(policy.weight)(gm).graph_module
        with torch.no_grad():
            outs.append(q(**g.inputs).logits)
    assert torch.equal(outs[0], outs[1])


@settings(max_examples=30)
@given(channels=st.integers(2, 48), groups=st.integers(1, 48), seed=st.integers(0, 10_000))
def test_sorted_groups_cover_their_data_and_permute_bijectively(channels, groups, seed):
    groups = min(groups, channels)
    gen = torch.Generator().manual_seed(seed)
    data = torch.randn(3, 7, channels, generator=gen) * torch.rand(channels, generator=gen).mul(50)
    obs = Observer(QuantSpec(granularity=Granularity.PER_GROUP, groups=groups, sort_channels=True))
    obs(data)
    perm = obs.permutation()
    assert sorted(perm) == list(range(channels))
    ranges = (obs.max_val - obs.min_val)[list(perm)]
    assert torch.all(ranges[1:] >= ranges[:-1])  # channels sorted by calibrated range
    scale, zp = obs.qparams()
    index = group_index(channels, groups, perm)
    for k in range(groups):
        members = index == k
        lo = ((0 - zp[members]) * scale[members]).min()  # qmin = 0 for unsigned
        hi = ((obs.spec.qmax - zp[members]) * scale[members]).max()
        values = data[..., members]
        half = float(scale[members][0]) / 2 * 1.001  # zero-point rounding moves the grid by < half a step
        assert float(values.min()) >= float(lo) - half and float(values.max()) <= float(hi) + half
        assert torch.all(scale[members] == scale[members][0])  # one scale per group


def test_group_channels_refuses_calibrated_observers():
    g = build_model("gpt2", layers=1)
    gm = _observed(g)
    calibrate(gm, [g.inputs], progress=False)
    with pytest.raises(PassError, match="must run before calibrate"):
        GroupChannels()(gm)


def _token_outlier_model():
    spec = OutlierSpec(embedding_scale=1.0)
    g = build_model("bert", layers=1, hidden=32, heads=4, batch=4, seq=12, outliers=spec, seed=3)
    with torch.no_grad():  # token id 5 carries huge values (like [SEP] in BERT)
        g.model.embeddings.word_embeddings.weight[5] *= 60
    g.inputs["input_ids"][:, 2] = 5
    return g


def test_clipping_never_widens_ranges_and_lowers_the_output_error():
    g = _token_outlier_model()
    gm = _observed(g)
    calibrate(gm, [g.inputs], progress=False)
    result = ClipTokenwise([g.inputs], per_block=True)(gm)
    plan = result.plan
    assert result.modified and plan.loss_final < plan.loss_unclipped
    assert plan.loss_final <= plan.loss_global <= plan.loss_unclipped
    for name, obs in observers(result.graph_module).items():
        lo, hi = obs.range()
        assert float(lo) >= float(obs.min_val) - 1e-6 and float(hi) <= float(obs.max_val) + 1e-6, name
    assert "token-wise clipping" in plan.summary()


def test_clipping_progress_bar_counts_every_evaluation(capsys):
    g = _token_outlier_model()
    gm = _observed(g)
    calibrate(gm, [g.inputs], progress=False)
    quiet = ClipTokenwise([g.inputs]).analyze(gm)
    shown = ClipTokenwise([g.inputs], progress=True).analyze(gm)
    assert shown.alphas == quiet.alphas and shown.loss_final == quiet.loss_final
    n = shown.evaluations
    assert n > len(shown.candidates) + 1  # the per-block stage ran
    err = capsys.readouterr().err
    assert "token-wise clipping: 100%" in err and f"{n}/{n}" in err


def test_clipping_needs_calibration():
    g = build_model("bert", layers=1)
    with pytest.raises(PassError, match="calibrated observers"):
        ClipTokenwise([g.inputs])(_observed(g))


@pytest.mark.parametrize("recipe", ["os", "peg", "os+peg", "best"])
def test_recipes_run_end_to_end(recipe):
    g = _token_outlier_model()
    qmodel, report = outlierfx.quantize(g.model, [g.inputs], recipe=recipe, progress=False)
    names = [e.pass_name for e in report.audit]
    if "os" in recipe:
        assert names[0] == "MigrateGamma" and "ClipTokenwise" in names
    if "peg" in recipe or recipe == "best":
        assert "GroupChannels" in names
        convert = report.audit.entries[-1].plan
        assert convert.grouped and all(sorted(p) == list(range(len(p))) and len(p) in (32, 64)
                                       for _, _, p in convert.grouped)  # hidden or FFN channels
    if recipe == "best":  # range-sized groups on every channel-axis tensor, not only the residual stream
        grouped = report.audit.entries[-1].plan.grouped
        assert {len(p) for _, _, p in grouped} == {32, 64} and {k for _, k, _ in grouped} == {24}
    with torch.no_grad():
        assert torch.isfinite(qmodel(**g.inputs).last_hidden_state).all()
