"""SmolLM2 W4A8 (per-channel int4 weights, simulated; static per-tensor int8
activations, first token on its own grid): how each int4 row's scale is chosen before GPTQ
rounds it, on one calibrated ``rotate+sink`` graph (MSE-clipped rows, LM head 8-bit, as the
preset below 8-bit weights). The graph is captured, rotated and calibrated once; each variant
redoes only the row scales, GPTQ and the conversion, then scores Wikipedia perplexity.

Row scale choosers (``scales`` part of a variant; every constant below is set here, none
was tuned on the evaluation windows):
- ``diag``: the preset's: the MSE range per row with each column's error weighted by the
  Gram diagonal ``H_jj`` (:func:`outlierfx.quantizers.gptq_rounding.row_grid`), on the symmetric grid
  (codes -7..7: 15 levels, so that min-max reads the scale back from max |w|).
- ``asym``: ``diag``'s range search on the asymmetric grid: 16 levels (codes 0..15) over the
  MSE-shrunk ``c * [lo, hi]`` with a per-row zero point, as GPTQ's reference code and most
  int4 checkpoints store rows. The LM head keeps its symmetric 8-bit rows in both.
- ``asymsearch``: ``gptqsearch`` on ``asym``'s grid (the six ranges ``c [lo, hi]`` around the
  MSE range, each with its own zero point).
- ``fullh``: the per-row clipping range that minimises the Linear's output error on the
  calibration inputs with round-to-nearest, ``d H d^T`` with the *full* Gram matrix. The
  objective is a sum over rows, each with one scalar range, so a grid over ``c * max|w|``
  (c in [0.5, 1], 51 points: MSE search's own interval, finer) gives the global optimum that
  learned weight clipping (OmniQuant's LWC, STE + Adam) approaches at the Linear level.
- ``gptqsearch``: GPTQ runs at six scales per row around ``diag``'s, up to min-max
  (``SEARCH_POINTS``), and each row keeps the rounding with the smallest ``d H d^T`` after
  GPTQ: the range scored by the rounding that is actually used (six times GPTQ's time).

``--time-steps`` measures what one training step would cost instead (learned clipping against
each decoder block's output, OmniQuant; a learned residual rotation, SpinQuant): one forward and
backward of the float model on one calibration batch (a lower bound for the fake-quant model's
step), and folding a d x d rotation into every weight matrix with the hidden size on one side
(forward only; its backward costs about twice that).

A variant is ``scales[:seq][:a16][:natural][:refit][:nosink][:prefix][:firstrows][:damp<f>]`` (``:seq``: sequential GPTQ, each
Linear's Hessian from the model whose earlier Linears are rounded; ``:a16``: the same int4
weights scored with float activations, to split the gap between weights and activations;
``:natural``: GPTQ rounds each weight's columns in their own order instead of act order
(decreasing Hessian diagonal, the default); ``:refit``: after GPTQ each row's step is refit by
least squares to its codes (``GPTQ(refit_scales=True)``); ``:damp<f>``: GPTQ's Hessian damping as a fraction
of its mean diagonal, e.g. ``damp0.1``, instead of the default 0.01; ``:nosink``: GPTQ's Gram
matrices leave out each sequence's first token, whose massive activations (SmolLM2's attention
sink) can dominate ``X^T X``; the first token still runs through the rounded weights when
scored; ``:prefix``: when scored, every Linear computes each sequence's first position with its
float weight on its float input, simulating a first token whose keys and values come from the
float model, a prefix cached in float as PrefixQuant does; later positions use the rounded
weights; ``:firstrows``: GPTQ's first-row corrections, ``GPTQ(first_rows=True)``, one float
vector per Linear added at each text's first token, the preset's below 8-bit weights). ``--samples`` sets the
calibration passages (the benchmarks use 32).

    PYTHONPATH=$PWD .venv/bin/python bench/scripts/w4a8_weight_rounding.py diag,fullh --json out.json
    PYTHONPATH=$PWD .venv/bin/python bench/scripts/w4a8_weight_rounding.py gptqsearch:seq --samples 128 --json out.json
    PYTHONPATH=$PWD .venv/bin/python bench/scripts/w4a8_weight_rounding.py asym --rotation r1.pt --news --json out.json

``--rotation`` takes a residual rotation learned elsewhere (``learned_rotation.py``).

``--bos ID`` puts one fixed token before every calibration passage and every scored window (the
product form of ``:prefix``: a prefix whose keys and values a float model computes once, as
PrefixQuant caches them). Every perplexity, FP32's included (an extra ``fp32`` row in the same
run), then scores the same predictions as without it: each window's tokens from its second on,
predicted with the prefix in their context; the prefix's own prediction of the window's first
token is left out. With ``:nosink`` GPTQ's Hessians leave out the prefix; with ``:prefix`` it runs
in float.

    PYTHONPATH=$PWD .venv/bin/python bench/scripts/w4a8_weight_rounding.py asym:prefix,asym:nosink:prefix --bos 0 --news --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import time
import types
from collections.abc import Callable, Iterator

import torch
import torch.fx

from outlierfx.benchmarks import CALIBRATION, load_with_calibration
from outlierfx.evaluate import DecoderEval
from outlierfx.graph import capture
from outlierfx.graph.attrs import fetch_attr
from outlierfx.graph.copy import copy_graph_module
from outlierfx.passes import gptq as gptq_module
from outlierfx.passes.calibrate import Calibrate
from outlierfx.passes.convert_fake_quant import ConvertToFakeQuant
from outlierfx.passes.gptq import GPTQ
from outlierfx.passes.insert_observers import InsertObservers
from outlierfx.passes.manager import PassManager
from outlierfx.passes.rotate_residual import RotateResidual
from outlierfx.passes.training import lm_loss
from outlierfx.quantizers.fake_quant import qparams_from_range
from outlierfx.quantizers.observers import FakeQuantize
from outlierfx.quantizers.policy import parse_bits
from outlierfx.quantizers.spec import Estimator, QuantSpec
from outlierfx.recipes import paper_recipe
from outlierfx.recipes.base import RunContext, Stage

ScaleChooser = Callable[[torch.Tensor, QuantSpec, torch.Tensor], torch.Tensor]  # symmetric rows' scales
RANGE_GRID = torch.linspace(0.5, 1.0, 51)  # c * max|w| per row: MSE search's interval, finer
DEFAULT_DAMP = inspect.signature(GPTQ).parameters["damp"].default  # the preset's (GPTQ's 1%)


def row_errors(weight: torch.Tensor, scales: torch.Tensor, gram: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per row, ``d H d^T`` of round-to-nearest at ``scales`` (one per row)."""
    step = scales.unsqueeze(1)
    delta = weight - torch.clamp(torch.round(weight / step), -qmax, qmax) * step
    return ((delta @ gram) * delta).sum(1)


def full_gram_scales(weight: torch.Tensor, spec: QuantSpec, gram: torch.Tensor) -> torch.Tensor:
    """Per row, the clipping range on ``RANGE_GRID`` with the smallest round-to-nearest output error."""
    w, h = weight.detach().float(), gram.float()
    top = (w.abs().amax(1) / spec.qmax).clamp_min(1e-12)
    best_err, best = None, top.clone()
    for c in RANGE_GRID.tolist():
        err = row_errors(w, top * c, h, spec.qmax)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, top * c, best)
    return best.to(weight.dtype)


# GPTQ-scored search: from just below the chooser's range c [lo, hi] up to min-max, (c + t (1 - c)) [lo, hi]
# (the one-off that measured 22.97 in docs/experiments/rotation.md; set there, not tuned on test windows)
SEARCH_POINTS = (-0.2, 0.0, 0.25, 0.5, 0.75, 1.0)


def gptq_search(weight, gram, spec, damp=0.01, block=128, grid=None, act_order=True, refit_scales=False,
                _round=gptq_module.gptq_round):
    """``gptq_round`` at each of ``SEARCH_POINTS``' row ranges ``c [lo, hi]``, from just below the
    chooser's ``c`` up to min-max (c = 1) on the spec's grid (symmetric or asymmetric), keeping per
    row the rounding with the smallest ``d H d^T`` (GPTQ rounds rows independently, so the choice
    is per row)."""
    if spec.bits >= 8 or grid is None:
        return _round(weight, gram, spec, damp, block, grid=grid, act_order=act_order, refit_scales=refit_scales)
    w = weight.detach()
    lo, hi = w.amin(1).clamp_max(0), w.amax(1).clamp_min(0)
    full, _ = qparams_from_range(lo, hi, spec)
    chosen = (grid[0].float() / full).clamp(max=1.0)  # the chooser's range as a fraction of min-max
    h = gram.double()
    best, best_err, pinned = None, None, 0
    for t in SEARCH_POINTS:
        c = (chosen + t * (1 - chosen)).clamp_min(1e-6)
        scale, zero_point = qparams_from_range(lo * c, hi * c, spec)
        rounded, lost = _round(weight, gram, spec, damp, block, grid=(scale.to(weight.dtype), zero_point),
                               act_order=act_order, refit_scales=refit_scales)
        delta = weight.double() - rounded.double()
        err = torch.einsum("oi,ij,oj->o", delta, h, delta)
        if best is None:
            best, best_err, pinned = rounded.clone(), err, lost
            continue
        better = err < best_err
        best[better] = rounded[better]
        best_err = torch.where(better, err, best_err)
    return best, pinned


CHOOSERS: dict[str, ScaleChooser | None] = {"diag": None, "fullh": full_gram_scales, "gptqsearch": None, "asym": None,
                                             "asymsearch": None}
ASYMMETRIC = {"asym", "asymsearch"}  # choosers whose rows are on the asymmetric grid (per-row zero point)
MODES = {"seq", "a16", "natural", "refit", "nosink", "prefix", "firstrows"}  # a variant's flags besides damp<f> (the module docstring)
SEARCHED = {"gptqsearch", "asymsearch"}  # choosers whose ranges GPTQ's own error picks (gptq_search)


@contextlib.contextmanager
def patched(chooser: ScaleChooser | None, search: Callable | None) -> Iterator[None]:
    """GPTQ's row scales (below 8 bits) from ``chooser``, its rounding from ``search``."""
    saved = gptq_module.row_grid, gptq_module.gptq_round

    def row_grid(weight, spec, gram=None):
        if chooser is None or spec.bits >= 8 or gram is None:
            return saved[0](weight, spec, gram)
        scales = chooser(weight, spec, gram)
        return scales, torch.zeros_like(scales, dtype=torch.int32)

    gptq_module.row_grid = row_grid
    if search is not None:
        gptq_module.gptq_round = search
    try:
        yield
    finally:
        gptq_module.row_grid, gptq_module.gptq_round = saved


@contextlib.contextmanager
def first_token_left_out(active: bool) -> Iterator[None]:
    """GPTQ's Gram recorders skip each sequence's first real token while active (``:nosink``)."""
    saved = gptq_module.GramRecorder.forward

    def forward(self, x):
        mask = self.mask
        kept = torch.ones(x.shape[:2], dtype=torch.bool) if mask is None else mask.clone()
        first = kept.int().argmax(1)  # each row's first real token (right-padded batches: position 0)
        kept[torch.arange(kept.shape[0]), first] = False
        self.mask = kept
        try:
            return saved(self, x)
        finally:
            self.mask = mask

    if active:
        gptq_module.GramRecorder.forward = forward
    try:
        yield
    finally:
        gptq_module.GramRecorder.forward = saved


def first_position_in_float(model: torch.fx.GraphModule, floats: torch.fx.GraphModule) -> int:
    """Rewrite ``model`` (converted, fake quant) so that each Linear computes position 0 of its
    ``[batch, seq, features]`` input from the float input (before its activation quantizer) with
    the float weight of the same-named Linear in ``floats`` (the calibrated graph before GPTQ);
    the number of Linears rewritten (``:prefix``)."""
    float_by_name = {n.name: n for n in floats.graph.nodes}
    rewritten = 0
    aten = torch.ops.aten
    for node in list(model.graph.nodes):
        twin = float_by_name.get(node.name)
        if node.target is not aten.linear.default or twin is None or not isinstance(twin.args[1], torch.fx.Node) \
                or twin.args[1].op != "get_attr":
            continue
        x = node.args[0]
        if x.op == "call_module" and isinstance(model.get_submodule(str(x.target)), FakeQuantize):
            x = x.args[0]
        name = f"prefix_float_{node.name}"
        val = node.meta.get("val")
        if val is not None and val.dim() != 3:
            raise SystemExit(f":prefix expects [batch, seq, features] Linear outputs, {node.name} has {tuple(val.shape)}")
        model.register_buffer(name, fetch_attr(floats, str(twin.args[1].target)).detach())
        with model.graph.inserting_before(node.next):  # in order, right after the Linear
            weight = model.graph.get_attr(name)
            first_in = model.graph.call_function(aten.slice.Tensor, (x, 1, 0, 1))
            first = model.graph.call_function(aten.linear.default, (first_in, weight, *node.args[2:]))
            rest = model.graph.call_function(aten.slice.Tensor, (node, 1, 1, None))
            joined = model.graph.call_function(aten.cat.default, ([first, rest], 1))
        node.replace_all_uses_with(joined, delete_user_cb=lambda user: user is not rest)
        rewritten += 1
    model.recompile()
    return rewritten


def with_prefix(batch: dict[str, torch.Tensor], bos: int | None) -> dict[str, torch.Tensor]:
    """``batch`` (right-padded or unpadded) with the token ``bos`` before each row (``--bos``)."""
    if bos is None:
        return batch
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids))
    if not bool(mask[:, 0].all()):
        raise SystemExit("--bos needs right-padded batches (a row starts with padding)")
    column = torch.ones_like(ids[:, :1])
    return {**batch, "input_ids": torch.cat([column * bos, ids], 1), "attention_mask": torch.cat([column, mask], 1)}


def perplexity(model: torch.nn.Module, windows: torch.Tensor, bos: int | None) -> float:
    """``DecoderEval.perplexity``, with ``bos`` before each window: the model's logits at the
    prefix are dropped, so the same predictions are scored (each window's tokens from its second
    on), the prefix in their context."""
    if bos is None:
        return DecoderEval.perplexity(model, windows)

    def prefixed(**inputs: torch.Tensor) -> types.SimpleNamespace:
        return types.SimpleNamespace(logits=model(**with_prefix(inputs, bos)).logits[:, 1:])

    return DecoderEval.perplexity(prefixed, windows)


def calibrated_graph(samples: int, rotation: torch.Tensor | None = None, bos: int | None = None):
    """(loaded model, batches, recipe, policy, the calibrated rotate+sink graph before GPTQ);
    ``rotation``: the residual stream's Q instead of the preset's seeded Hadamard; ``bos``: a
    token before every passage."""
    CALIBRATION["decoder"] = {**CALIBRATION["decoder"], "samples": samples}
    loaded, batches = load_with_calibration("smollm2")
    batches = [with_prefix(b, bos) for b in batches]
    recipe = paper_recipe("rotate+gptq+sink")
    recipe = dataclasses.replace(recipe, weight_estimator=Estimator.MSE)
    if rotation is not None:
        recipe = dataclasses.replace(recipe, prepare=tuple(
            dataclasses.replace(s, settings={**s.settings, "matrix": rotation}) if s.pass_type is RotateResidual else s
            for s in recipe.prepare))
    policy = recipe.policy(parse_bits("W4A8"))
    context = RunContext(batches, policy)
    gm = capture(loaded.model.eval(), batches[0])
    prepared = PassManager([*recipe.build(Stage.PREPARE, context), InsertObservers(policy),
                            *recipe.build(Stage.OBSERVE, context)])(gm).graph_module
    calibrated = PassManager([Calibrate(batches)])(prepared).graph_module
    finish = recipe.build(Stage.FINISH, context)
    if [type(p) for p in finish] != [GPTQ]:
        raise SystemExit(f"expected rotate+gptq+sink's finish stage to be GPTQ alone, got {finish}")
    return loaded, batches, recipe, policy, calibrated, finish[0]


def time_training_steps(model: torch.nn.Module, batch: dict[str, torch.Tensor], repeats: int = 2) -> dict[str, float]:
    """Seconds per forward+backward of the float model on one batch (every weight trainable: a
    lower bound for a fake-quant training step, whose quantizers add work) and per fold of a d x d
    rotation into every weight matrix that has the hidden size d on one side."""
    weights = [p for p in model.parameters() if p.dim() == 2]
    for p in weights:
        p.requires_grad_(True)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        lm_loss(model(**batch), batch).backward()
        times.append(time.perf_counter() - start)
    d = model.config.hidden_size
    rotation = torch.linalg.qr(torch.randn(d, d))[0]
    start = time.perf_counter()
    with torch.no_grad():
        for p in weights:
            _ = p @ rotation if p.shape[1] == d else rotation.T @ p
    return {"step_s": min(times), "tokens": int(batch["attention_mask"].sum()),
            "fold_s": time.perf_counter() - start, "hidden": d}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", help="comma-separated scales[:seq][:a16][:natural][:refit][:nosink][:prefix][:firstrows][:damp<f>], "
                        "scales in "
                        + ", ".join(CHOOSERS))
    parser.add_argument("--json", required=True)
    parser.add_argument("--samples", type=int, default=CALIBRATION["decoder"]["samples"])
    parser.add_argument("--time-steps", action="store_true", help="time one training step instead")
    parser.add_argument("--news", action="store_true", help="score the news windows too")
    parser.add_argument("--bos", type=int, help="a token id before every passage and window (the module docstring)")
    parser.add_argument("--rotation", help="a .pt file whose 'matrix' is the residual stream's rotation (e.g. "
                        "learned by learned_rotation.py) in place of the preset's seeded Hadamard")
    args = parser.parse_args()
    if args.time_steps:
        loaded, batches = load_with_calibration("smollm2")
        timing = time_training_steps(loaded.model.float().train(), batches[0])
        print(json.dumps(timing), flush=True)
        with open(args.json, "w") as f:
            json.dump({"timing": timing, "threads": torch.get_num_threads()}, f, indent=2)
        return
    start = time.perf_counter()
    rotation = torch.load(args.rotation)["matrix"] if args.rotation else None
    loaded, batches, recipe, policy, calibrated, gptq = calibrated_graph(args.samples, rotation, args.bos)
    evaluator = DecoderEval.build(loaded)
    print(f"calibrated rotate+sink graph in {time.perf_counter() - start:.0f}s ({len(batches)} batches)", flush=True)
    rows = []
    if args.bos is not None:  # FP32's perplexities with the same prefix: what the variants compare against
        fp32 = {"variant": "fp32", "bos": args.bos, "ppl_wiki": perplexity(loaded.model, evaluator.wiki, args.bos)}
        if args.news:
            fp32["ppl_news"] = perplexity(loaded.model, evaluator.news, args.bos)
        rows.append(fp32)
        print(json.dumps(fp32), flush=True)
    for variant in args.variants.split(","):
        scales, *modes = variant.split(":")
        damps = [m for m in modes if m.startswith("damp")]
        if scales not in CHOOSERS or not set(modes) - set(damps) <= MODES or len(damps) > 1:
            raise SystemExit(f"unknown variant {variant!r}")
        start = time.perf_counter()
        gptq.sequential, gptq.act_order, gptq.refit_scales = "seq" in modes, "natural" not in modes, "refit" in modes
        gptq.first_rows = "firstrows" in modes
        gptq.damp = float(damps[0][len("damp"):]) if damps else DEFAULT_DAMP
        # the asymmetric grid is the spec's: GPTQ rounds and the conversion reads back with it
        gptq.weight_spec = weight_spec = (policy.weight.with_(symmetric=False, signed=False) if scales in ASYMMETRIC
                                          else policy.weight)
        search = gptq_search if scales in SEARCHED else None
        with patched(CHOOSERS[scales], search), first_token_left_out("nosink" in modes):
            rounded = PassManager([gptq])(copy_graph_module(calibrated))
        plan = next(e.plan for e in rounded.audit.entries if e.pass_name == "GPTQ")
        model = ConvertToFakeQuant(weight_spec, policy.embedding)(rounded.graph_module).graph_module
        prefix_linears = first_position_in_float(model, calibrated) if "prefix" in modes else 0
        for module in model.modules():
            if isinstance(module, FakeQuantize) and "a16" in modes:
                module.enabled = False
        rounding_s = time.perf_counter() - start
        row = {"variant": variant, "rotation": args.rotation or "preset (hadamard, seed 0)", "samples": args.samples, "weight_spec": weight_spec.describe(),
               "act_order": plan.act_order, "refit_scales": plan.refit_scales, "damp": gptq.damp,
               "layer_error": sum(r.gptq_error for r in plan.linears), "prefix_linears": prefix_linears,
               "first_row_corrections": len(plan.first_rows), "rounding_s": round(rounding_s, 1),
               "bos": args.bos, "ppl_wiki": perplexity(model, evaluator.wiki, args.bos)}
        if prefix_linears or plan.first_rows:  # position 0 should now be the float model's (up to the 8-bit embedding table)
            ids = with_prefix({"input_ids": evaluator.wiki[:1], "attention_mask": torch.ones_like(evaluator.wiki[:1])},
                              args.bos)
            with torch.no_grad():
                ours = model(**ids).logits[0, 0].log_softmax(-1)
                fp32 = loaded.model(**ids).logits[0, 0].log_softmax(-1)
            row["first_position_max_logprob_gap"] = float((ours - fp32).abs().max())
        if args.news:
            row["ppl_news"] = perplexity(model, evaluator.news, args.bos)
        row["total_s"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "threads": torch.get_num_threads()}, f, indent=2)


if __name__ == "__main__":
    main()
