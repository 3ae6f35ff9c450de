"""Bad input to capture gets one clear error that names the problem."""

import pytest
import torch

import outlierfx
from outlierfx.errors import CaptureError, DataError


class BranchesOnValues(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


class CallsNumpy(torch.nn.Module):
    def forward(self, x):
        return torch.from_numpy(x.numpy() * 2)


def test_data_dependent_branch_names_the_line_and_a_fix():
    with pytest.raises(CaptureError) as info:
        outlierfx.capture(BranchesOnValues(), (torch.randn(3),))
    message = str(info.value)
    assert "cannot capture BranchesOnValues" in message
    assert "tensor *values*" in message and "torch.cond" in message
    assert "test_capture_errors.py" in message and "if x.sum() > 0" in message


def test_numpy_call_is_explained():
    with pytest.raises(CaptureError, match="cannot capture CallsNumpy"):
        outlierfx.capture(CallsNumpy(), (torch.randn(3),))


def test_not_a_module():
    with pytest.raises(CaptureError, match="expects a torch.nn.Module"):
        outlierfx.capture(lambda x: x, (torch.randn(3),))


def test_inputs_of_the_wrong_type():
    with pytest.raises(DataError, match="tuple of positional arguments or a dict"):
        outlierfx.capture(torch.nn.Linear(2, 2), [torch.randn(2)])


def test_nan_inputs_are_rejected():
    x = torch.randn(2, 2)
    x[0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN or inf"):
        outlierfx.capture(torch.nn.Linear(2, 2), (x,))


def test_inputs_swallowed_by_var_kwargs_are_named():
    from outlierfx.testing import build_model

    g = build_model("llama")
    inputs = dict(g.inputs, token_type_ids=torch.zeros_like(g.inputs["input_ids"]))
    with pytest.raises(CaptureError, match=r"\['token_type_ids'\] are not named parameters of LlamaForCausalLM"):
        outlierfx.capture(g.model, inputs)


def test_a_graph_that_drifts_from_the_model_is_refused_despite_the_float_noise_allowance(monkeypatch):
    import importlib

    capture_module = importlib.import_module("outlierfx.graph.capture")  # the package re-exports the function
    canonicalize = capture_module.canonicalize

    def one_percent_off(gm):
        rewrites = canonicalize(gm)
        linear = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default)
        with gm.graph.inserting_after(linear):
            scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (linear, 1.01))
        linear.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
        gm.recompile()
        return rewrites

    monkeypatch.setattr(capture_module, "canonicalize", one_percent_off)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    with pytest.raises(CaptureError, match="does not reproduce the model.*float64 copy"):
        outlierfx.capture(model, (torch.randn(2, 8),))


def test_fp32_rounding_is_allowed_as_far_as_the_model_itself_shows_it():
    """At rel_tol=0 any rounding difference fails the first check; the graph is then held to
    the model's own distance from a float64 copy of it (attention is decomposed by capture)."""
    from outlierfx.graph import meta
    from outlierfx.testing import build_model

    g = build_model("bert", seed=0)
    gm = outlierfx.capture(g.model, g.inputs, rel_tol=0.0)
    report = gm.meta[meta.GM_CAPTURE_REPORT]
    assert report.error.max_abs > 0 and report.float_noise is not None and report.float_noise > 0
