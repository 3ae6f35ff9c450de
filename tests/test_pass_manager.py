"""The pass base and pass manager: copies, audit trail, checks and error messages."""

import dataclasses
import gc
import json
import weakref

import pytest
import torch
import torch.fx

import outlierfx
from outlierfx.errors import PassError
from outlierfx.graph.attrs import fetch_attr, set_attr
from outlierfx.graph.meta import GM_EXAMPLE_INPUTS
from outlierfx.graph.ops import aten
from outlierfx.passes import GraphPass, PassManager, PassResult
from outlierfx.passes.check_sample import CheckSample, check_sample


@dataclasses.dataclass(frozen=True)
class ScalePlan:
    linears: tuple[torch.fx.Node, ...]

    def summary(self):
        return f"{len(self.linears)} linears get an exact x2 / x0.5 pair"


class InsertExactScalePair(GraphPass[ScalePlan]):
    """Toy pass that changes the graph but not the numbers: y = linear(x) * 2 * 0.5."""

    def analyze(self, gm):
        return ScalePlan(tuple(n for n in gm.graph.nodes if n.target is aten.linear.default))

    def apply(self, gm, plan):
        for linear in plan.linears:
            users = list(linear.users)
            with gm.graph.inserting_after(linear):
                up = gm.graph.call_function(aten.mul.Tensor, (linear, 2.0))
            with gm.graph.inserting_after(up):
                down = gm.graph.call_function(aten.mul.Tensor, (up, 0.5))
            for user in users:
                user.replace_input_with(linear, down)
        return bool(plan.linears)


class FindsNothing(GraphPass[tuple]):
    def analyze(self, gm):
        return ()

    def apply(self, gm, plan):
        return False


class Perturb(GraphPass[None]):
    """Changes numerics while claiming to preserve them."""

    def analyze(self, gm):
        return None

    def apply(self, gm, plan):
        out = gm.graph.output_node()
        first = out.args[0][0]
        with gm.graph.inserting_before(out):
            bumped = gm.graph.call_function(aten.add.Tensor, (first, 1.0))
        out.args = ((bumped,) + tuple(out.args[0][1:]),)
        return True


class DoubleThenHalveWeights(GraphPass[ScalePlan]):
    """Toy pass that rewrites every Linear weight (new tensors, the way rotations do): x2 on
    even calls, x0.5 on odd ones, so two in a row leave the numbers as they were."""

    output_rel_tol = None

    def __init__(self, factor):
        self.factor = factor

    def analyze(self, gm):
        return ScalePlan(tuple(n for n in gm.graph.nodes if n.target is aten.linear.default))

    def apply(self, gm, plan):
        for linear in plan.linears:
            target = linear.args[1].target
            set_attr(gm, target, torch.nn.Parameter(fetch_attr(gm, target).detach() * self.factor))
        return bool(plan.linears)


class Crashes(GraphPass[None]):
    def analyze(self, gm):
        raise RuntimeError("boom")

    def apply(self, gm, plan):  # pragma: no cover
        return False


@pytest.fixture
def captured():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    return outlierfx.capture(model, (torch.randn(3, 8),))


def test_pass_never_mutates_its_input(captured):
    before = [(n.name, n.target, n.args) for n in captured.graph.nodes]
    result = InsertExactScalePair()(captured)
    assert result.modified and result.graph_module is not captured
    assert [(n.name, n.target, n.args) for n in captured.graph.nodes] == before
    assert len(result.graph_module.graph.nodes) == len(before) + 4


def test_audit_records_a_modifying_pass_and_a_no_op(captured):
    pipeline = PassManager([InsertExactScalePair(), FindsNothing()])
    result = pipeline(captured)
    changed, unchanged = result.audit.entries
    assert changed.modified and len(changed.diff.added) == 4 and not changed.diff.removed
    assert len(changed.diff.changed) == 2  # the consumers of the two linears now read the new muls
    assert changed.error_vs_previous.max_abs == 0.0 and changed.error_vs_reference.max_abs == 0.0
    assert not unchanged.modified and unchanged.diff.added == () and unchanged.error_vs_previous is None
    assert result.modified

    data = json.loads(result.audit.to_json())
    assert [p["pass"] for p in data["passes"]] == ["InsertExactScalePair", "FindsNothing"]
    assert len(data["passes"][0]["plan"]["linears"]) == 2
    text = result.audit.to_text()
    assert "1. InsertExactScalePair: modified, +4 -0 ~2 nodes" in text
    assert "2 linears get an exact x2 / x0.5 pair" in text
    assert "2. FindsNothing: no change" in text


def test_the_audit_keeps_intermediate_graphs_nodes_but_not_their_weights(captured):
    # each pass's plan names nodes of the graph it produced; the audit must not keep that
    # graph's rewritten weights alive (on SmolLM2 they were most of a 5 GB quantize run)
    made = []

    def recording(pass_):
        def run(gm):
            result = pass_(gm)
            made.append(weakref.ref(result.graph_module))
            return result
        return run

    result = PassManager([recording(DoubleThenHalveWeights(2.0)), recording(DoubleThenHalveWeights(0.5)),
                          recording(DoubleThenHalveWeights(2.0))])(captured)
    gc.collect()
    assert [ref() is not None for ref in made] == [False, False, True]  # the final graph lives on
    assert made[-1]() is result.graph_module
    first_plan = result.audit.entries[0].plan
    assert [n.name for n in first_plan.linears] == ["linear", "linear_1"]  # nodes still readable
    assert result.audit.to_json()
    for linear in first_plan.linears:  # the final graph has its own weights: x2 x0.5 x2
        target = linear.args[1].target
        torch.testing.assert_close(fetch_attr(result.graph_module, target), 2 * fetch_attr(captured, target))
    assert captured.graph.owning_module is captured  # the caller's graph is never touched


def test_a_pass_that_breaks_equivalence_is_named_with_its_predecessors(captured):
    with pytest.raises(PassError, match=r"pass Perturb \(after InsertExactScalePair, FindsNothing\) changed the outputs"):
        PassManager([InsertExactScalePair(), FindsNothing(), Perturb()])(captured)


def test_a_numerics_changing_pass_can_opt_out_of_the_check(captured):
    class DeliberatePerturb(Perturb):
        output_rel_tol = None

    result = PassManager([DeliberatePerturb()])(captured)
    assert result.audit.entries[0].error_vs_reference.max_abs == pytest.approx(1.0)


def test_a_crashing_pass_is_named(captured):
    with pytest.raises(PassError, match=r"pass Crashes \(after no earlier passes\) failed: RuntimeError: boom"):
        PassManager([Crashes()])(captured)


def test_a_pass_returning_the_wrong_type_is_rejected(captured):
    with pytest.raises(PassError, match="expected PassResult"):
        PassManager([lambda gm: gm])(captured)


def test_plain_callables_work_as_passes(captured):
    result = PassManager([lambda gm: PassResult(gm, False)], check_outputs=False)(captured)
    assert not result.modified and len(result.audit) == 1


def test_checks_run_on_a_sample_of_the_example_where_its_outputs_are_large(captured):
    """The example is 3 rows of 4 outputs: a limit of 8 output elements keeps 2 of its rows for
    the checks (each holds the reference and the previous outputs), and the audit says so."""
    result = PassManager([InsertExactScalePair(), FindsNothing()], check_elements=8)(captured)
    changed, unchanged = result.audit.entries
    assert changed.checked_on == CheckSample(sequences=2, of_sequences=3, tokens=None)
    assert changed.error_vs_reference.max_abs == 0.0 and unchanged.checked_on is None  # nothing ran
    assert json.loads(result.audit.to_json())["passes"][0]["checked_on"] == {"sequences": 2, "of_sequences": 3,
                                                                            "tokens": None}
    assert "on 2 of 3 sequences of the example" in result.audit.to_text()
    whole = PassManager([InsertExactScalePair()])(captured).audit.entries[0].checked_on
    assert whole == CheckSample(sequences=3, of_sequences=3, tokens=None) and whole.whole_example
    with pytest.raises(PassError, match="pass Perturb .* changed the outputs"):  # a sample still catches it
        PassManager([Perturb()], check_elements=4)(captured)


def test_the_check_sample_keeps_the_sequences_with_the_most_real_tokens():
    model = torch.nn.Embedding(10, 6)

    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = model

        def forward(self, input_ids, attention_mask):
            return self.embed(input_ids) * attention_mask[..., None]

    ids = torch.randint(0, 10, (4, 5))
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    gm = outlierfx.capture(Masked(), {"input_ids": ids, "attention_mask": mask})
    (args, kwargs), sample = check_sample(gm, gm.meta[GM_EXAMPLE_INPUTS], max_elements=2 * 5 * 6)
    assert sample == CheckSample(sequences=2, of_sequences=4, tokens=10)
    assert torch.equal(kwargs["input_ids"], ids[[1, 3]]) and torch.equal(kwargs["attention_mask"], mask[[1, 3]])
    static = outlierfx.capture(Masked(), {"input_ids": ids, "attention_mask": mask}, dynamic=False)
    inputs = static.meta[GM_EXAMPLE_INPUTS]
    assert check_sample(static, inputs, max_elements=1) == (inputs, None)  # a static batch cannot be cut


def test_the_check_sample_cuts_an_attention_mask_whose_batch_the_graph_only_broadcasts():
    """torch.export gives a mask whose batch no op ties to the ids' its own symbol (SmolLM2's
    capture does): laid out [batch, tokens] like the ids, it is cut with them, else a graph that
    adds something mask-shaped to the ids' rows broadcasts a one-sequence sample back to four."""

    class Broadcast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 6)

        def forward(self, input_ids, attention_mask):
            return self.embed(input_ids) + attention_mask.amax(0)[None, :, None]

    ids = torch.randint(0, 10, (4, 5))
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    gm = outlierfx.capture(Broadcast(), {"input_ids": ids, "attention_mask": mask})
    shapes = [n.meta["val"].shape for n in gm.graph.nodes if n.op == "placeholder"]
    assert str(shapes[0][0]) != str(shapes[1][0]) and str(shapes[0][1]) == str(shapes[1][1])  # the case at hand
    (args, kwargs), sample = check_sample(gm, gm.meta[GM_EXAMPLE_INPUTS], max_elements=5 * 6)
    assert sample == CheckSample(sequences=1, of_sequences=4, tokens=5)
    assert torch.equal(kwargs["input_ids"], ids[[1]]) and torch.equal(kwargs["attention_mask"], mask[[1]])
