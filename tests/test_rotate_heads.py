"""RotateHeads: each head's values rotated, folded into the value and output Linears."""

import pytest
import torch
from hypothesis import given, settings

import outlierfx
from outlierfx.graph.attrs import fetch_attr
from outlierfx.passes import PassManager, RotateHeads
from outlierfx.testing import OutlierSpec, assert_equivalent, build_model, transformer_models

TOL = RotateHeads.output_rel_tol
ROTATABLE = ("bert", "llama", "qwen2", "mistral")  # GPT-2's values are a slice of the fused c_attn


@settings(max_examples=20, deadline=None)
@given(g=transformer_models(families=ROTATABLE))
def test_head_rotation_is_exact_and_fires(g):
    gm = outlierfx.capture(g.model, g.inputs)
    result = RotateHeads(seed=2)(gm)
    assert_equivalent(g.model, result.graph_module, g.inputs, tol=TOL)
    plan = result.plan
    assert result.modified and len(plan.paths) == g.config.num_hidden_layers and not plan.blockers
    assert plan.head_dim == g.config.hidden_size // g.config.num_attention_heads
    for path in plan.paths:
        for linear in (path.value, path.output):
            target = str(linear.args[1].target)
            assert not torch.equal(fetch_attr(result.graph_module, target), fetch_attr(gm, target))
    # no op added: the rotation lives in the weights
    assert len(result.graph_module.graph.nodes) == len(gm.graph.nodes)


def test_grouped_query_values_and_biases_rotate_with_massive_activations():
    g = build_model("qwen2", hidden=64, heads=8, kv_heads=2, layers=2,
                    outliers=OutlierSpec(gamma_scale=200.0, embedding_scale=100.0, channels=(3, 40)))
    gm = outlierfx.capture(g.model, g.inputs)
    result = PassManager([RotateHeads(seed=1)])(gm)
    (entry,) = result.audit
    assert entry.modified and entry.error_vs_previous.within(TOL)
    assert "rotated the values of 2 attention layers per head (head_dim=8)" in entry.plan.summary()
    value = entry.plan.paths[0].value
    assert value.args[2] is not None  # qwen2's v_proj bias was rotated with its rows
    assert_equivalent(g.model, result.graph_module, g.inputs, tol=TOL)


def test_fused_qkv_is_left_alone_and_the_plan_says_why():
    g = build_model("gpt2", layers=2)
    gm = outlierfx.capture(g.model, g.inputs)
    result = RotateHeads()(gm)
    assert not result.modified and not result.plan.paths
    assert "the values come from" in result.plan.summary() and "not a Linear" in result.plan.summary()


def test_a_value_projection_read_elsewhere_blocks_its_layer():
    class Leaky(torch.nn.Module):  # returns the value projection too: rotating it would change the output
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (torch.nn.Linear(16, 16) for _ in range(4))

        def forward(self, x):
            projections = [m(x) for m in (self.q, self.k, self.v)]
            q, k, v = (p.view(x.shape[0], x.shape[1], 2, 8).transpose(1, 2) for p in projections)
            probs = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
            context = (probs @ v).transpose(1, 2).reshape(x.shape)
            return self.o(context), projections[2]

    model, x = Leaky().eval(), torch.randn(2, 5, 16)
    gm = outlierfx.capture(model, (x,))
    result = RotateHeads()(gm)
    assert not result.modified
    assert "the value projection is also read by output" in result.plan.summary()
