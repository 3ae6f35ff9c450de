"""RotateFFN: an online Hadamard transform before each FFN output Linear, and its Kronecker builder."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import outlierfx
from outlierfx.graph.hadamard_op import HADAMARD
from outlierfx.graph.ops import is_call
from outlierfx.passes import PassManager, RotateFFN
from outlierfx.quantizers.hadamard import MAX_FACTOR, kronecker_hadamard
from outlierfx.testing import FAMILIES, DECODER_FAMILIES, OutlierSpec, assert_equivalent, build_model, transformer_models

TOL = RotateFFN.output_rel_tol


@pytest.mark.parametrize("d, left, right", [(1536, 32, 48), (576, 24, 24), (64, 8, 8), (96, 8, 12),
                                            (7, 7, 1), (11008, 43, 256)])
def test_kronecker_split_is_orthogonal_and_cheapest(d, left, right):
    rotation = kronecker_hadamard(d, seed=3)
    assert (rotation.left.matrix.shape[0], rotation.right.matrix.shape[0]) == (left, right)
    assert max(left, right) <= MAX_FACTOR
    if d <= 1536:
        q = rotation.matrix
        torch.testing.assert_close(q @ q.T, torch.eye(d, dtype=torch.float64), atol=1e-10, rtol=0)


@settings(max_examples=10, deadline=None)
@given(d=st.sampled_from([12, 16, 24, 36, 48, 96]), tokens=st.integers(1, 9), seed=st.integers(0, 50))
def test_the_online_op_multiplies_by_the_kronecker_matrix(d, tokens, seed):
    rotation = kronecker_hadamard(d, seed)
    x = torch.randn(2, tokens, d, dtype=torch.float64)
    got = HADAMARD(x, rotation.left.matrix, rotation.right.matrix)
    torch.testing.assert_close(got, x @ rotation.matrix, atol=1e-12, rtol=0)


@settings(max_examples=20, deadline=None)
@given(g=transformer_models(families=FAMILIES + DECODER_FAMILIES[1:]), seed=st.integers(0, 50))
def test_ffn_rotation_is_exact_and_fires_on_every_family(g, seed):
    gm = outlierfx.capture(g.model, g.inputs)
    result = RotateFFN(seed=seed)(gm)
    assert_equivalent(g.model, result.graph_module, g.inputs, tol=TOL)
    assert result.modified and len(result.plan.linears) == g.config.num_hidden_layers
    transforms = [n for n in result.graph_module.graph.nodes if is_call(n, HADAMARD)]
    assert len(transforms) == g.config.num_hidden_layers
    assert all(list(t.users) == [linear] for t, linear in zip(transforms, result.plan.linears))


def test_the_pass_manager_checks_the_tolerance_with_massive_ffn_activations():
    g = build_model("llama", hidden=64, heads=4, layers=3, ffn=192,
                    outliers=OutlierSpec(gamma_scale=200.0, embedding_scale=100.0, channels=(3, 40)))
    gm = outlierfx.capture(g.model, g.inputs)
    result = PassManager([RotateFFN(seed=1)])(gm)
    (entry,) = result.audit
    assert entry.modified and entry.error_vs_previous.within(TOL)
    assert "online Hadamard transform (d=192 = 12 x 16" in entry.plan.summary()
    assert_equivalent(g.model, result.graph_module, g.inputs, tol=TOL)


def test_a_model_with_the_online_transform_saves_without_pickle_and_reloads_bit_exactly(tmp_path):
    g = build_model("llama", hidden=64, heads=4, layers=2, ffn=96, batch=2, seq=12, pad=False)
    qmodel, report = outlierfx.quantize(g.model, [g.inputs], recipe="rotate+sink", backend="onednn", progress=False)
    assert any(is_call(n, HADAMARD) for n in report.graphs.simulated.graph.nodes)
    outlierfx.save(qmodel, tmp_path / "q")
    assert "torch.ops.outlierfx.hadamard.default" in (tmp_path / "q" / "graph.json").read_text()
    loaded = outlierfx.load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(qmodel(**g.inputs).logits, loaded(**g.inputs).logits)
