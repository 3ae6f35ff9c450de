"""The rewrites before calibration (the ``rotate`` recipe's MigrateGamma, RotateResidual,
RotateHeads, RotateFFN) on a graph captured without weights (issue 28, ``--low-memory``): each
rewritten weight is recorded as a computation on its checkpoint tensor (a ``DerivedTensor``),
computed only when a block loads it, and equals the full-memory rewrite bit for bit; the whole
``rotate+sink`` run, lowered, is the full-memory run's int8 model."""

from __future__ import annotations

import pytest
import torch

import outlierfx
import outlierfx.graph.weight_source as weight_source
from outlierfx.backends import runnable_backends
from outlierfx.graph import meta
from outlierfx.graph.derived_tensors import DerivedTensor
from outlierfx.graph.weight_source import StoredTensor, capture_without_weights, materialize, value_of
from outlierfx.passes.lower import lower_model
from outlierfx.passes.manager import PassManager
from outlierfx.passes.rotation_folding import CHUNK, LEFT, RIGHT, rotated
from outlierfx.quantizers.hadamard import hadamard
from outlierfx.quantizers.policy import parse_bits
from outlierfx.recipes.base import RunContext, Stage
from outlierfx.recipes.papers import paper_recipe
from outlierfx.recipes.runner import run_recipe
from outlierfx.testing import first_token_grids_everywhere, saved_llama

LAYERS = 2
RECIPE = "rotate+sink"
PASSES = ["MigrateGamma", "RotateResidual", "RotateHeads", "RotateFFN"]
COMPUTED = {"model.rotary_emb.inv_freq"}  # computed at capture, not loaded: real throughout
FFN_HADAMARD = {"ffn_hadamard_left", "ffn_hadamard_right"}  # RotateFFN's own small matrices: real, not in the source


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    g, batches = saved_llama(folder, LAYERS, ((1, 8, 2), (2, 5, 3)))
    return g, folder, batches


def _prepare(gm: torch.fx.GraphModule, batches):
    """The recipe's prepare stage under the pass manager (its output checks run in block order on
    a weight-free graph)."""
    recipe = paper_recipe(RECIPE)
    context = RunContext(batches, recipe.policy(parse_bits("W8A8")))
    return PassManager(recipe.build(Stage.PREPARE, context))(gm)


def _tensors(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict([*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)])


def _real(gm: torch.nn.Module) -> set[str]:
    return {name for name, t in _tensors(gm).items() if t.device.type != "meta"}


def _block(target: str) -> str | None:
    return ".".join(target.split(".")[:3]) if target.startswith("model.layers.") else None


# each pass fired at every site of the generated Llama (a pass that fired nowhere passes vacuously)
FIRED = {"MigrateGamma": lambda p: len(p.migrations) == 2 * LAYERS + 1 and not p.skipped,
         "RotateResidual": lambda p: p.applicable and len(p.writers) == 2 * LAYERS,
         "RotateHeads": lambda p: len(p.paths) == LAYERS and not p.blockers,
         "RotateFFN": lambda p: len(p.linears) == LAYERS and not p.blockers}


def test_the_rotations_on_a_weight_free_graph_equal_the_full_memory_rotations(saved):
    g, folder, batches = saved
    full = _prepare(outlierfx.capture(g.model, g.inputs), batches)
    light = _prepare(capture_without_weights(folder, g.inputs), batches)

    assert [e.pass_name for e in light.audit.entries] == PASSES
    for got, want in zip(light.audit.entries, full.audit.entries):
        assert got.modified and FIRED[got.pass_name](got.plan), got.pass_name
        assert got.plan.summary() == want.plan.summary()
        assert got.error_vs_reference == want.error_vs_reference  # checked by a forward in block order
        assert got.error_vs_reference is not None

    gm = light.graph_module
    # nothing was computed: every weight is meta, its rewrites recorded; only new small matrices are real
    assert _real(gm) == COMPUTED | FFN_HADAMARD
    source = gm.meta[meta.GM_WEIGHT_SOURCE]
    derived = {t for t, e in source.tensors.items() if isinstance(e, DerivedTensor)}
    assert derived == {t for t in _tensors(full.graph_module) if t.endswith("proj.weight")} | \
        {"lm_head.weight", "lm_head.weight_migrated"}  # the table (rotated) and the head (migrated, rotated)
    chain = source.tensors["model.layers.0.self_attn.v_proj.weight"]  # migrated, residual- then head-rotated
    assert [chain.description, chain.inputs[0].description, chain.inputs[0].inputs[0].description] == \
        [f"RotateHeads: {LEFT}", f"RotateResidual: {RIGHT}", "MigrateGamma: W diag(factor)"]
    assert isinstance(chain.inputs[0].inputs[0].inputs[0], StoredTensor)
    # the migrated norm gains are gone from both graphs (and from the source)
    assert not [t for t in source.tensors if "layernorm" in t or t == "model.norm.weight"]

    materialize(gm, source.tensors)
    expected, got = _tensors(full.graph_module), _tensors(gm)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert tensor.dtype == got[name].dtype and torch.equal(tensor, got[name]), name
    with torch.no_grad():
        for batch in batches:
            assert torch.equal(gm(**batch).logits, full.graph_module(**batch).logits)


def test_the_rotations_hold_at_most_one_block_of_float_weights(saved, monkeypatch):
    """The passes read only norm gains (value_of); the pass manager's checks load one block at a
    time (or one tensor read outside blocks); no rewritten weight is ever registered for real."""
    g, folder, batches = saved
    loads: list[tuple[set[str], set[str]]] = []  # (targets loaded, real before the load)
    loaded = weight_source._loaded

    def recording(gm, source, targets):
        targets = list(targets)
        loads.append((set(targets), _real(gm) - COMPUTED - FFN_HADAMARD))
        return loaded(gm, source, targets)

    monkeypatch.setattr(weight_source, "_loaded", recording)
    _prepare(capture_without_weights(folder, g.inputs), batches)
    monkeypatch.undo()

    assert len(loads) > 5 * (LAYERS + 1)  # the analyses' gain reads and five checking forwards' units
    heads = {"lm_head.weight", "lm_head.weight_migrated"}  # the table the embedding reads, the head's migrated copy
    for targets, real in loads:
        now = targets | real
        assert len({_block(t) for t in now} - {None}) <= 1, now  # one block's tensors at most
        outside = {t for t in now if _block(t) is None}
        assert outside <= heads | {"model.norm.weight"} and len(outside & heads) <= 1, now
    # the passes themselves read the block norm gains only, one at a time: MigrateGamma's
    # analyze and apply, once each (the checks load them with their blocks)
    gains = [targets for targets, _ in loads if len(targets) == 1 and "layernorm" in next(iter(targets))]
    assert len(gains) == 2 * 2 * LAYERS


def test_the_input_graph_and_its_source_are_never_changed(saved):
    g, folder, batches = saved
    gm = capture_without_weights(folder, g.inputs)
    source = gm.meta[meta.GM_WEIGHT_SOURCE]
    entries = dict(source.tensors)
    stand_ins = _tensors(gm)
    nodes = [(n.name, n.target, n.args) for n in gm.graph.nodes]

    _prepare(gm, batches)
    assert gm.meta[meta.GM_WEIGHT_SOURCE] is source and dict(source.tensors) == entries
    assert all(isinstance(e, StoredTensor) for e in source.tensors.values())
    assert [(n.name, n.target, n.args) for n in gm.graph.nodes] == nodes
    assert _tensors(gm).keys() == stand_ins.keys()
    # the manager's reference forward loads and releases each block, so stand-ins are new objects,
    # but of the same shapes and dtypes
    assert all((t.shape, t.dtype) == (stand_ins[name].shape, stand_ins[name].dtype) for name, t in _tensors(gm).items())
    assert _real(gm) == COMPUTED
    assert torch.equal(value_of(gm, "model.norm.weight"), g.model.model.norm.weight)  # loaded, not registered
    assert _real(gm) == COMPUTED


@pytest.mark.parametrize("how", [RIGHT, LEFT])
def test_rotating_in_chunks_equals_rotating_whole(how):
    """``rotated`` works CHUNK rows (columns) at a time; each chunk's products are the whole
    product's, so the result is the one-shot float64 product rounded once."""
    torch.manual_seed(0)
    q = hadamard(64, 3).matrix
    value = torch.randn(2 * CHUNK + 5, 64) if how == RIGHT else torch.randn(128, 2 * CHUNK + 5)
    v = value.double()
    whole = (v.reshape(v.shape[0], -1, 64) @ q).reshape(v.shape) if how == RIGHT else \
        (q.T @ v.reshape(-1, 64, v.shape[-1])).reshape(v.shape)
    assert torch.equal(rotated(value, q, how), whole.float())
    overwritten = value.clone()
    assert rotated(overwritten, q, how, in_place=True) is overwritten  # each chunk read before it is written
    assert torch.equal(overwritten, whole.float())


@pytest.mark.parametrize("backend", runnable_backends(("reference", "onednn")))
def test_a_weight_free_rotate_sink_run_lowers_to_the_full_memory_int8_model(saved, backend):
    g, folder, batches = saved
    recipe = paper_recipe(RECIPE)
    policy = recipe.policy(parse_bits("W8A8"))  # linear-inputs, the first token on a grid of its own
    assert policy.activation.sink_tokens == 1
    with first_token_grids_everywhere():  # the generated model has no attention sink: two grids at every site
        full = run_recipe(outlierfx.capture(g.model, g.inputs), recipe, policy, batches)
        light = run_recipe(capture_without_weights(folder, g.inputs), recipe, policy, batches)
    assert [e.pass_name for e in light.audit.entries] == [e.pass_name for e in full.audit.entries]
    for got, want in zip(light.audit.entries, full.audit.entries):
        assert got.modified == want.modified and got.error_vs_reference == want.error_vs_reference, got.pass_name

    expected, _ = lower_model(full.graph_module, backend)
    lowered, _ = lower_model(light.graph_module, backend)
    got, want = _tensors(lowered), _tensors(expected)
    assert got.keys() == want.keys()
    assert len([t for t in want.values() if t.dtype == torch.int8]) >= 7 * LAYERS // (2 if backend == "onednn" else 1)
    for name, tensor in want.items():
        assert tensor.dtype == got[name].dtype and torch.equal(tensor, got[name]), name
    with torch.no_grad():
        for batch in batches:
            assert torch.equal(lowered(**batch).logits, expected(**batch).logits)


def test_a_derived_tensor_loads_a_shared_input_once_and_must_keep_its_shape():
    from outlierfx.errors import PassError
    from outlierfx.graph.derived_tensors import evaluate

    loads = []
    stored = StoredTensor(None, "table")  # a leaf: only `load` reads it

    def load(entry):
        loads.append(entry.key)
        return torch.arange(6.0).reshape(2, 3)

    doubled = DerivedTensor((stored,), lambda t: 2 * t, (2, 3), torch.float32, "doubled")
    chained = DerivedTensor((doubled, stored), lambda a, b: a + b, (2, 3), torch.float32, "doubled + table")
    values = evaluate([chained, doubled, stored], load)
    assert loads == ["table"]
    assert torch.equal(values[chained], 3 * torch.arange(6.0).reshape(2, 3))
    assert torch.equal(values[doubled], 2 * torch.arange(6.0).reshape(2, 3))
    reshaped = DerivedTensor((stored,), lambda t: t.T, (2, 3), torch.float32, "a transpose")
    with pytest.raises(PassError, match="a transpose computed .* shape \\(3, 2\\)"):
        evaluate([reshaped], load)


def test_a_chain_of_rewrites_computes_in_place_only_into_values_nobody_else_holds():
    """A table loaded, scaled and rotated holds one table when each link computes into its input
    (SmolLM2's LM head: 108 MB, not 216); an input another entry reads, or one the caller gets,
    is never overwritten, and the values are the out-of-place ones bit for bit."""
    from outlierfx.graph.derived_tensors import evaluate

    torch.manual_seed(0)
    table, gain, q = torch.randn(3 * CHUNK + 1, 64), torch.rand(64) + 0.5, hadamard(64, 3).matrix
    stored = StoredTensor(None, "table")
    loaded = []

    def load(entry):
        loaded.append(table.clone())
        return loaded[-1]

    def chain(in_place):
        scaled = DerivedTensor((stored,), lambda w: w * gain, tuple(table.shape), torch.float32, "W diag(g)",
                               (lambda w: w.mul_(gain)) if in_place else None)
        return scaled, DerivedTensor((scaled,), lambda w: rotated(w, q, RIGHT), tuple(table.shape), torch.float32,
                                     "W Q", (lambda w: rotated(w, q, RIGHT, in_place=True)) if in_place else None)

    _, want = chain(in_place=False)
    expected = evaluate([want], load)[want]
    assert expected.data_ptr() != loaded[-1].data_ptr()
    _, head = chain(in_place=True)
    got = evaluate([head], load)[head]
    assert torch.equal(got, expected) and got.data_ptr() == loaded[-1].data_ptr()  # one table in all
    scaled, head = chain(in_place=True)
    values = evaluate([scaled, head], load)  # the caller gets the scaled table too: the rotation copies it
    assert torch.equal(values[scaled], table * gain) and torch.equal(values[head], expected)
    embedding = DerivedTensor((stored,), lambda w: rotated(w, q, RIGHT), tuple(table.shape), torch.float32, "E Q",
                              lambda w: rotated(w, q, RIGHT, in_place=True))
    scaled, head = chain(in_place=True)
    values = evaluate([head, embedding], load)  # a tied table: the first reader may not overwrite it
    assert torch.equal(values[head], expected) and torch.equal(values[embedding], rotated(table, q, RIGHT))
    assert len(loaded) == 4  # one load per evaluation, the tied table included


def test_rotate_ffn_records_one_shared_rotation_for_all_its_linears(saved, monkeypatch):
    """Each recorded rotation keeps its Q alive until the run ends: RotateFFN must build its
    Kronecker matrix once (built per Linear, SmolLM2 held 30 copies of 18 MB)."""
    from outlierfx.passes.rotate_ffn import RotateFFN
    from outlierfx.quantizers.hadamard import KroneckerRotation

    g, folder, _ = saved
    built = []
    matrix = KroneckerRotation.matrix

    def counted(self):
        built.append(1)
        return matrix.fget(self)

    monkeypatch.setattr(KroneckerRotation, "matrix", property(counted))
    result = RotateFFN()(capture_without_weights(folder, g.inputs))
    assert len(result.plan.linears) == LAYERS > 1
    assert len(built) == 1
