"""First-row corrections: one float vector per Linear, added to its output at each text's first token.

Decoders such as SmolLM2 turn their first token into an attention sink: from a few layers in,
its hidden state carries massive activations and is nearly the same vector whatever the text.
Every later token attends to its keys and values, so the first position's error through low-bit
weights costs more than its share of tokens (on SmolLM2 W4A8, computing that position with float
weights is worth 0.35 of a 2.28 perplexity gap; docs/experiments/rotation.md). The output head
is left alone: nothing reads its first row but the first token's own prediction. Because that
position's inputs are nearly constant, so is its error ``W x0 - Q(W) q(x0)``, and one vector
per Linear removes most of it: the mean of that error over the calibration texts, ``W`` the float
weight, ``x0`` the Linear's input before its activation quantizer, ``Q(W) q(x0)`` what the
quantized Linear computes. The vectors are measured in graph order, each Linear's after the
earlier ones are in place (one node-by-node pass over the calibration batches,
:class:`~outlierfx.graph.lockstep.Lockstep`), so each one corrects what its input really is.

Nothing is tuned: the correction is a mean over the calibration set. The int8 kernels are
untouched; the graph gains ``out + first * vector`` after each corrected Linear
(``aten.addcmul``, ``first`` the graph's first-token mask as a ``[batch, tokens, 1]`` float),
so every backend and the saved format run it as is, and a decode step behind a filled cache
(which has no first token) adds nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, ContextManager

import torch
import torch.fx

from .. import distributed
from ..distributed import Reduction
from ..graph import meta
from ..graph.attrs import fetch_attr, set_attr, unique_attr_name
from ..graph.first_tokens import (ATTENTION_MASK, CACHE_POSITION, first_token_mask, first_token_mask_node,
                                   leading_columns)
from ..graph.lockstep import Lockstep
from ..graph.ops import feeds_only_outputs
from ..quantizers.observers import FakeQuantize

aten = torch.ops.aten
CREATED_BY = "GPTQ"


class FirstRowError(torch.nn.Module):
    """One Linear's first-row errors ``W x0 - y0`` over texts (their sum and summed squares;
    ranks add theirs) and the correction they support."""

    STATISTICS: ClassVar[Mapping[str, Reduction]] = {"total": Reduction.SUM, "squares": Reduction.SUM,
                                                     "texts": Reduction.SUM}

    def __init__(self) -> None:
        super().__init__()
        self.total: torch.Tensor | None = None
        self.squares = torch.zeros((), dtype=torch.float64)
        self.texts = torch.zeros((), dtype=torch.long)

    def add(self, error: torch.Tensor) -> None:
        error = error.double()
        self.total = error.sum(0) if self.total is None else self.total + error.sum(0)
        self.squares += error.pow(2).sum()
        self.texts += error.shape[0]

    def correction(self) -> tuple[torch.Tensor, float] | None:
        """The mean error shrunk toward zero by how uncertain it is, and the factor kept (None
        with fewer than two texts). Positive-part James-Stein: the mean of n texts' errors misses
        their expectation by ``tr(Sigma) / n`` in squared norm, so it keeps ``1 - tr(Sigma) /
        (n |mean|^2)`` of itself (all of it where every text's first row errs alike: the
        attention sink's near-constant rows; nothing where the mean is within its own noise)."""
        n = int(self.texts)
        if self.total is None or n < 2:
            return None
        mean = self.total / n
        spread = max(float(self.squares) - n * float(mean.pow(2).sum()), 0.0) / (n - 1)  # tr(Sigma)
        size = float(mean.pow(2).sum())
        kept = max(0.0, 1.0 - spread / (n * size)) if size > 0 else 0.0
        return mean * kept, kept


def _by_token(x: object, first: torch.Tensor) -> bool:
    """Whether ``x`` is ``[batch, tokens, features]`` with the first-token mask's batch and tokens."""
    return isinstance(x, torch.Tensor) and x.dim() == 3 and tuple(x.shape[:2]) == tuple(first.shape)


def _first_rows(x: torch.Tensor, first: torch.Tensor) -> torch.Tensor | None:
    """``x``'s first-token rows ``[texts, features]`` (None where ``x`` is not laid out by token)."""
    return x[first] if _by_token(x, first) else None


def _unquantized_input(gm: torch.fx.GraphModule, linear: torch.fx.Node) -> torch.fx.Node:
    """What ``linear`` reads before its activation quantizer (its input itself if it has none)."""
    x = linear.args[0]
    if x.op == "call_module" and isinstance(gm.get_submodule(str(x.target)), FakeQuantize):
        return x.args[0]
    return x


def measure_in_lockstep(work: torch.fx.GraphModule, gm: torch.fx.GraphModule, targets: Sequence[torch.fx.Node],
                        rounded: Callable[[str], bool],
                        loaded: Callable[[list[str]], ContextManager[Any]] = lambda targets: contextlib.nullcontext()
                        ) -> tuple[Callable[[torch.fx.Node, Sequence[Lockstep]], None], dict[str, torch.Tensor]]:
    """A hook to call after each node of ``work`` (the fake-quant work graph of ``gm``, whose
    ``targets`` are its Linears; its batches carry an ``attention_mask``) has run on every batch,
    and the corrections it fills (Linear name -> vector). At a target that ``rounded(name)`` says
    was rounded it measures the mean first-row error against ``gm``'s float weight (its tensors
    readable inside ``loaded(targets)``: a graph captured without weights loads them there) and
    adds it to the runs' outputs, so later Linears see corrected inputs."""
    firsts: dict[int, torch.Tensor] = {}

    def first_of(run: Lockstep, x: torch.Tensor) -> torch.Tensor:
        """The run's first-token mask (a cache graph's tokens sit at its ``cache_position``; a
        batch without a mask: column 0 of ``x``, a ``[batch, tokens, ...]`` value of the run)."""
        mask = run.inputs.get(ATTENTION_MASK)
        if mask is None:
            return leading_columns(x, 1)
        if id(run) not in firsts:
            firsts[id(run)] = first_token_mask(mask, run.inputs.get(CACHE_POSITION), 1)
        return firsts[id(run)]

    # a Linear whose result only leaves the graph (the LM head) has a first row nothing later reads,
    # and the constant cannot fix the first token's own prediction, which varies with the token
    names = {n.name for n in targets if not feeds_only_outputs(n)}
    linears = [n for n in work.graph.nodes if n.name in names]
    source = {n: _unquantized_input(work, n) for n in linears}
    waiting: dict[torch.fx.Node, list[torch.fx.Node]] = {x: [] for x in source.values()}
    for linear, x in source.items():  # an input -> its Linears: it may be freed before they run
        waiting[x].append(linear)
    kept: dict[torch.fx.Node, list[torch.Tensor | None]] = {}  # an input's first rows, per run
    corrections: dict[str, torch.Tensor] = {}

    def after(node: torch.fx.Node, runs: Sequence[Lockstep]) -> None:
        if node in waiting:  # None where the input is not [batch, tokens, features]
            kept[node] = [_first_rows(run.env[node], first_of(run, run.env[node])) for run in runs]
        if node not in source:
            return
        x0 = kept[source[node]]
        waiting[source[node]].remove(node)
        if not waiting[source[node]]:
            del kept[source[node]]
        if not rounded(node.name) or any(rows is None for rows in x0) \
                or not all(_by_token(run.env[node], first_of(run, run.env[node])) for run in runs):
            return
        bias = node.args[2] if len(node.args) > 2 and isinstance(node.args[2], torch.fx.Node) else None
        tensors = [str(node.args[1].target), *([] if bias is None else [str(bias.target)])]
        error = FirstRowError()
        with loaded(tensors):
            weight = fetch_attr(gm, tensors[0])
            bias_value = None if bias is None else fetch_attr(gm, tensors[1])
            for run, rows in zip(runs, x0, strict=True):
                float_out = torch.nn.functional.linear(rows.to(weight.dtype), weight, bias_value)
                error.add(float_out.float() - run.env[node][first_of(run, run.env[node])].float())
        distributed.reduce_statistics([error])
        shrunk = error.correction()
        if shrunk is None or shrunk[1] == 0.0:
            return
        corrections[node.name] = shrunk[0].to(weight.dtype)
        for run in runs:
            out = run.env[node]
            rows = first_of(run, out).unsqueeze(-1).to(out.dtype)
            run.env[node] = torch.addcmul(out, rows, corrections[node.name].to(out.dtype))

    return after, corrections


def insert_corrections(gm: torch.fx.GraphModule, corrections: Mapping[str, torch.Tensor]) -> int:
    """After each Linear named in ``corrections``, ``out + first * vector``; the number inserted
    (0 in a graph without an ``attention_mask`` input, which cannot tell its texts' first tokens)."""
    first = first_token_mask_node(gm, 1, CREATED_BY) if corrections else None
    if first is None:
        return 0
    as_float: dict[torch.dtype, torch.fx.Node] = {}  # the mask as [batch, tokens, 1] of each output dtype
    inserted = 0
    for node in list(gm.graph.nodes):
        vector = corrections.get(node.name)
        if vector is None:
            continue
        if vector.dtype not in as_float:
            with gm.graph.inserting_after(first):
                typed = gm.graph.call_function(aten._to_copy.default, (first,), {"dtype": vector.dtype})
            with gm.graph.inserting_after(typed):
                as_float[vector.dtype] = gm.graph.call_function(aten.unsqueeze.default, (typed, -1))
            for made in (typed, as_float[vector.dtype]):
                made.meta[meta.CREATED_BY] = CREATED_BY
        target = unique_attr_name(gm, f"{node.name}_first_row_correction")
        set_attr(gm, target, vector.detach().clone())
        with gm.graph.inserting_after(node):
            attr = gm.graph.get_attr(target)
        with gm.graph.inserting_after(attr):
            corrected = gm.graph.call_function(aten.addcmul.default, (node, as_float[vector.dtype], attr))
        for made in (attr, corrected):
            meta.inherit(made, node, CREATED_BY)
        if "val" in node.meta:
            corrected.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(corrected, delete_user_cb=lambda user: user is not corrected)
        inserted += 1
    gm.recompile()
    return inserted
