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


def test_on_a_cache_graph_the_values_rotate_through_the_cache_write_and_decoding_is_unchanged():
    from outlierfx.generation import QuantizedCausalLM
    from outlierfx.graph.kv_cache import CachedDecoder, cache_inputs

    g = build_model("llama", hidden=32, heads=4, kv_heads=2, layers=2,
                    outliers=OutlierSpec(gamma_scale=50.0, channels=(5,)))
    gm = outlierfx.capture(CachedDecoder(g.model), cache_inputs(g.config, g.inputs["input_ids"]))
    result = PassManager([RotateHeads(seed=1)])(gm)  # the manager's check: the logits, within TOL
    (entry,) = result.audit
    assert entry.modified and len(entry.plan.paths) == 2 and not entry.plan.blockers, entry.plan.summary()
    assert entry.error_vs_previous.within(TOL)
    rotated, plain = (QuantizedCausalLM(m, g.config) for m in (result.graph_module, gm))
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    # decode steps read values that earlier calls wrote rotated: the logits stay the model's
    by_cache, reference = rotated.incremental_logits(tokens).logits, plain.incremental_logits(tokens).logits
    assert float((by_cache - reference).abs().max() / reference.abs().max()) <= TOL
    # ... while the returned value caches differ: they hold the rotated values
    inputs = cache_inputs(g.config, tokens)
    _, _, values = result.graph_module(**inputs)
    _, _, plain_values = gm(**inputs)
    assert not torch.allclose(values[0], plain_values[0], atol=1e-3)


def test_a_returned_cache_blocks_the_rotation_outside_a_cache_graph():
    class ReturnsCache(torch.nn.Module):  # writes the values into a cache input and returns it, unmarked
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (torch.nn.Linear(16, 16) for _ in range(4))

        def forward(self, x, cache):
            q, k, v = (m(x).view(x.shape[0], x.shape[1], 2, 8).transpose(1, 2) for m in (self.q, self.k, self.v))
            v = cache.index_copy(2, torch.arange(x.shape[1]), v)
            probs = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
            return self.o((probs @ v).transpose(1, 2).reshape(x.shape)), v

    model, x = ReturnsCache().eval(), torch.randn(2, 5, 16)
    result = RotateHeads()(outlierfx.capture(model, (x, torch.zeros(2, 2, 5, 8))))
    assert not result.modified and "index_copy" in result.plan.summary()
