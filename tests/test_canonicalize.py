"""Each canonicalization rule on small hand-written modules, including the variants it accepts."""

import math

import pytest
import torch
import torch.nn.functional as F

import outlierfx
from outlierfx.graph import count_ops
from outlierfx.graph.ops import aten
from outlierfx.testing import assert_equivalent


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


class WrittenOutRMSNorm(torch.nn.Module):
    def __init__(self, dim, weight=True, weight_first=True):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(dim) + 0.5) if weight else None
        self.weight_first = weight_first

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        if self.weight is None:
            return h
        return self.weight * h if self.weight_first else h * self.weight


@pytest.mark.parametrize("weight,weight_first", [(True, True), (True, False), (False, True)])
def test_rms_norm_is_fused(weight, weight_first):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), WrittenOutRMSNorm(8, weight, weight_first), torch.nn.Linear(8, 4))
    x = torch.randn(2, 5, 8) * 10
    gm = outlierfx.capture(model, (x,))
    targets = _targets(gm)
    assert targets.count(aten.rms_norm.default) == 1
    assert aten.rsqrt.default not in targets and aten.pow.Tensor_Scalar not in targets
    rms = next(n for n in gm.graph.nodes if n.target is aten.rms_norm.default)
    assert (rms.args[2] is not None) == weight
    assert_equivalent(model, gm, (x,))


def test_rms_norm_over_a_non_last_axis_is_left_alone():
    class NotRMS(torch.nn.Module):
        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6)

    gm = outlierfx.capture(NotRMS(), (torch.randn(2, 3, 4),))
    assert aten.rms_norm.default not in _targets(gm)


class OffsetGainRMSNorm(torch.nn.Module):
    """Gemma's RMSNorm: the gain is ``1 + weight``, computed in float32 from a weight of any dtype."""

    def __init__(self, dim, one_first=True):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(dim) * 0.3)
        self.one_first = one_first

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        gain = 1.0 + self.weight.float() if self.one_first else self.weight.float() + 1
        return (h * gain).type_as(x)


@pytest.mark.parametrize("one_first", [True, False])
def test_a_computed_norm_gain_becomes_the_norm_gamma(one_first):
    norm = OffsetGainRMSNorm(8, one_first)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), norm, torch.nn.Linear(8, 4))
    weight = norm.weight.detach().clone()
    x = torch.randn(2, 5, 8) * 10
    gm = outlierfx.capture(model, (x,))
    targets = _targets(gm)
    rms = next(n for n in gm.graph.nodes if n.target is aten.rms_norm.default)
    assert rms.args[2] is not None and rms.args[2].op == "get_attr"
    assert str(rms.args[2].target) == "1.weight_gain"
    torch.testing.assert_close(getattr(gm, "1").weight_gain, 1 + weight, rtol=0, atol=0)
    assert aten.mul.Tensor not in targets and aten.add.Tensor not in targets and aten.type_as.default not in targets
    assert torch.equal(norm.weight, weight)  # the user's parameter still holds w, not 1 + w
    assert_equivalent(model, gm, (x,))


def test_a_gain_computed_from_an_activation_is_left_alone():
    class InputGain(torch.nn.Module):
        def forward(self, x, g):
            return torch.nn.functional.rms_norm(x, (8,)) * (1.0 + g)

    gm = outlierfx.capture(InputGain(), (torch.randn(2, 8), torch.randn(8)))
    rms = next(n for n in gm.graph.nodes if n.target is aten.rms_norm.default)
    assert len(rms.args) < 3 or rms.args[2] is None
    assert aten.mul.Tensor in _targets(gm)


class TanhGelu(torch.nn.Module):
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def test_written_out_tanh_gelu_becomes_one_gelu():
    x = torch.randn(4, 16) * 3
    gm = outlierfx.capture(TanhGelu(), (x,))
    gelus = [n for n in gm.graph.nodes if n.target is aten.gelu.default]
    assert len(gelus) == 1 and gelus[0].kwargs == {"approximate": "tanh"}
    assert aten.tanh.default not in _targets(gm)
    assert_equivalent(TanhGelu(), gm, (x,))


class Attention(torch.nn.Module):
    def __init__(self, **sdpa_kwargs):
        super().__init__()
        self.kwargs = sdpa_kwargs

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.kwargs)


@pytest.mark.parametrize(
    "kwargs,mask_kind",
    [({}, None), ({"is_causal": True}, None), ({}, "bool"), ({}, "float"), ({"scale": 0.3}, "bool"),
     ({"enable_gqa": True}, None)],
)
def test_attention_is_decomposed(kwargs, mask_kind):
    torch.manual_seed(0)
    heads_kv = 2 if kwargs.get("enable_gqa") else 4
    q = torch.randn(2, 4, 6, 8)
    k, v = torch.randn(2, heads_kv, 6, 8), torch.randn(2, heads_kv, 6, 8)
    args = (q, k, v)
    if mask_kind == "bool":
        mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
        mask[0, ..., 4:] = False
        args += (mask,)
    elif mask_kind == "float":
        args += (torch.randn(2, 1, 6, 6),)
    model = Attention(**kwargs)
    gm = outlierfx.capture(model, args)
    counts = count_ops(gm)
    assert aten.scaled_dot_product_attention.default not in _targets(gm)
    assert counts["matmul"] == 2 and counts["softmax"] == 1
    assert_equivalent(model, gm, args)


def test_bool_mask_bias_is_computed_once_for_all_layers():
    class TwoLayers(torch.nn.Module):
        def forward(self, q, mask):
            h = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
            return F.scaled_dot_product_attention(h, h, h, attn_mask=mask)

    q, mask = torch.randn(1, 2, 5, 4), torch.ones(1, 1, 5, 5, dtype=torch.bool)
    gm = outlierfx.capture(TwoLayers(), (q, mask))
    assert _targets(gm).count(aten.where.Scalar) == 1


class Conv1DLike(torch.nn.Module):
    """GPT-2's Conv1D: weight stored (in, out), applied with addmm on a flattened input."""

    def __init__(self, nx, nf, bias=True):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(nx, nf))
        self.bias = torch.nn.Parameter(torch.randn(nf)) if bias else None

    def forward(self, x):
        shape = x.size()[:-1] + (self.weight.shape[1],)
        flat = x.view(-1, x.size(-1))
        out = torch.addmm(self.bias, flat, self.weight) if self.bias is not None else torch.mm(flat, self.weight)
        return out.view(shape)


@pytest.mark.parametrize("bias", [True, False])
def test_conv1d_becomes_linear_without_touching_the_weight(bias):
    model = Conv1DLike(8, 12, bias)
    original = model.weight.detach().clone()
    x = torch.randn(2, 3, 8)
    gm = outlierfx.capture(model, (x,))
    linears = [n for n in gm.graph.nodes if n.target is aten.linear.default]
    assert len(linears) == 1 and (len(linears[0].args) == 3) == bias
    assert torch.equal(model.weight, original)
    assert_equivalent(model, gm, (x,))


def test_eval_dropout_and_noop_casts_are_removed():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5), torch.nn.Identity())

    class Casts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x.to(torch.float32)).contiguous() * 1

    gm = outlierfx.capture(Casts(), (torch.randn(2, 4),))
    assert _targets(gm) == [aten.linear.default]


def test_unused_outputs_and_their_weights_are_dropped():
    class DeadBranch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            self.unused(x)
            return self.used(x)

    gm = outlierfx.capture(DeadBranch(), (torch.randn(2, 4),))
    assert _targets(gm) == [aten.linear.default]
    assert not any(name.startswith("unused") for name, _ in gm.named_parameters())


class MatmulLinear(torch.nn.Module):
    """A Linear written as a matrix product, as Falcon's FalconLinear does (or with W stored [in, out])."""

    def __init__(self, form, bias):
        super().__init__()
        shape = (8, 12) if form == "x @ W" else (12, 8)
        self.weight = torch.nn.Parameter(torch.randn(shape))
        self.bias = torch.nn.Parameter(torch.randn(12)) if bias else None
        self.form = form

    def forward(self, x):
        w = self.weight
        product = {"x @ W.T": lambda: x @ w.T, "x @ W.t()": lambda: x @ w.t(),
                   "x @ W.transpose": lambda: torch.matmul(x, w.transpose(-1, -2)),
                   "x @ W": lambda: x @ w}[self.form]()
        return product if self.bias is None else product + self.bias


@pytest.mark.parametrize("form", ["x @ W.T", "x @ W.t()", "x @ W.transpose", "x @ W"])
@pytest.mark.parametrize("bias", [True, False])
def test_matrix_product_with_a_stored_weight_becomes_linear(form, bias):
    model = MatmulLinear(form, bias)
    original = model.weight.detach().clone()
    x = torch.randn(2, 3, 8)
    gm = outlierfx.capture(model, (x,))
    assert _targets(gm) == [aten.linear.default]
    assert (len(next(iter(n for n in gm.graph.nodes if n.target is aten.linear.default)).args) == 3) == bias
    assert torch.equal(model.weight, original)
    assert_equivalent(model, gm, (x,))


def test_a_product_of_two_activations_stays_a_matmul():
    class Scores(torch.nn.Module):
        def forward(self, q, k):
            return q @ k.transpose(-1, -2)

    gm = outlierfx.capture(Scores(), (torch.randn(2, 3, 8), torch.randn(2, 3, 8)))
    assert aten.linear.default not in _targets(gm) and aten.matmul.default in _targets(gm)


def test_contiguous_copy_of_a_permuted_tensor_is_kept_for_the_view_after_it():
    class PermuteView(torch.nn.Module):
        def forward(self, x):
            b, s, h, d = x.shape
            return x.permute(0, 2, 1, 3).contiguous().view(b, h, s * d)

    x = torch.randn(2, 5, 4, 3)
    gm = outlierfx.capture(PermuteView(), (x,))
    assert {aten.clone.default, aten.contiguous.default} & set(_targets(gm))
    assert_equivalent(PermuteView(), gm, (torch.randn(3, 7, 4, 3),))


def test_baddbmm_becomes_matmul_scale_and_add():
    class ScoresWithBias(torch.nn.Module):
        def forward(self, bias, q, k):
            return bias.baddbmm(q, k, beta=0.5, alpha=0.25)

    inputs = (torch.randn(6, 1, 5), torch.randn(6, 5, 4), torch.randn(6, 4, 5))
    gm = outlierfx.capture(ScoresWithBias(), inputs)
    assert aten.baddbmm.default not in _targets(gm) and aten.matmul.default in _targets(gm)
    assert_equivalent(ScoresWithBias(), gm, inputs)
