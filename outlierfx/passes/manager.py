"""Run an ordered list of passes with checks after each one, recording an audit trail."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from tqdm.auto import tqdm

from ..errors import DataError, PassError
from ..graph import meta
from ..graph.block_order import run_in_block_order
from ..graph.compare import OutputError, output_error, run
from ..graph.copy import release_tensors
from ..graph.shapes import propagate_values
from ..memory import return_freed_memory
from ..quantizers.observers import observation_paused
from .audit import AuditEntry, AuditTrail, GraphDiff
from .base import GraphPass, PassResult
from .check_sample import check_sample

Pass = Callable[[torch.fx.GraphModule], PassResult]


@dataclasses.dataclass(frozen=True)
class PipelineResult:
    graph_module: torch.fx.GraphModule
    audit: AuditTrail

    @property
    def modified(self) -> bool:
        return any(e.modified for e in self.audit)


class PassManager:
    """Runs passes in order; after each: lint, re-propagate shapes, compare outputs.

    Args:
        passes: callables ``GraphModule -> PassResult`` (usually :class:`GraphPass` instances).
        check_outputs: run the graph before and after each pass on ``sample_inputs`` and record
            the error; a pass that declares ``output_rel_tol`` fails if it exceeds it.
        sample_inputs: ``(args, kwargs)``; defaults to the inputs the graph was captured with.
            The checks run on a sample of its sequences where the compared outputs of all of
            them would be large (:mod:`.check_sample`; ``check_elements``: the limit, default
            ``CHECK_OUTPUT_ELEMENTS``); each audit entry says which.
        progress: a status bar that names the pass running (calibration, GPTQ, conversion and
            lowering take from seconds to minutes on a real model).

    Any failure raises :class:`PassError` naming the pass and the passes that ran before it.
    """

    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        check_outputs: bool = True,
        sample_inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None,
        check_elements: int | None = None,
        progress: bool = False,
    ) -> None:
        self.passes = list(passes)
        self.check_outputs = check_outputs
        self.sample_inputs = sample_inputs
        self.check_elements = check_elements
        self.progress = progress

    def __call__(self, gm: torch.fx.GraphModule) -> PipelineResult:
        inputs = self.sample_inputs or gm.meta.get(meta.GM_EXAMPLE_INPUTS)
        if self.check_outputs and inputs is None:
            raise PassError("check_outputs needs sample_inputs (the graph carries no captured example inputs)")
        sample = None
        if self.check_outputs:
            inputs, sample = check_sample(gm, inputs, self.check_elements)
        reference = self._run(gm, inputs) if self.check_outputs else None
        previous_out = reference
        first = gm  # the caller's graph: never released
        audit = AuditTrail()
        done: list[str] = []
        status = tqdm(total=len(self.passes), disable=not self.progress, leave=False, unit="pass",
                      bar_format="{desc} [pass {n_fmt}/{total_fmt}, {elapsed}]")
        for p in self.passes:
            name = getattr(p, "name", None) or type(p).__name__
            status.set_description_str(name)
            context = f"pass {name} (after {', '.join(done) if done else 'no earlier passes'})"
            start = time.perf_counter()
            try:
                result = p(gm)
            except PassError as exc:
                raise PassError(f"{context} failed: {exc}") from exc
            except DataError:
                raise  # bad input (e.g. calibration data): its message names the problem, not a pass's fault
            except Exception as exc:
                raise PassError(f"{context} failed: {type(exc).__name__}: {exc}") from exc
            if not isinstance(result, PassResult):
                raise PassError(f"{context} returned {type(result).__name__}, expected PassResult")
            new = result.graph_module
            err_prev = err_ref = None
            if result.modified:
                try:
                    new.graph.lint()
                    if not isinstance(p, GraphPass):  # GraphPass re-propagates itself
                        propagate_values(new)
                except Exception as exc:
                    raise PassError(f"{context} left an invalid graph: {type(exc).__name__}: {exc}") from exc
                if self.check_outputs:
                    return_freed_memory()  # the pass's temporaries: the check's values would sit among them
                    out = self._run(new, inputs)
                    mask = inputs[1].get("attention_mask")  # padded positions are compared out
                    mask = mask if isinstance(mask, torch.Tensor) else None
                    err_prev = output_error(previous_out, out, mask)
                    err_ref = output_error(reference, out, mask)
                    self._enforce(p, context, err_prev)
                    previous_out = out
            audit = audit.appended(
                AuditEntry(
                    pass_name=name,
                    modified=result.modified,
                    plan=result.plan,
                    diff=GraphDiff.between(gm.graph, new.graph) if result.modified else GraphDiff((), (), ()),
                    error_vs_previous=err_prev,
                    error_vs_reference=err_ref,
                    checked_on=sample if err_ref is not None else None,
                    seconds=time.perf_counter() - start,
                )
            )
            if gm is not first and gm is not new:  # an intermediate graph of this run: the audit keeps its nodes only
                release_tensors(gm)
            gm = new
            done.append(name)
            # the replaced outputs, the released graph's tensors: glibc keeps freed pages between live
            # ones, and the next pass's peak would start from this one's (docs/experiments/memory.md, 5.)
            return_freed_memory()
            status.update()
        status.close()
        return PipelineResult(gm, audit)

    @staticmethod
    def _run(gm: torch.fx.GraphModule, inputs: tuple[tuple, dict]) -> Any:
        with observation_paused():  # checks must not feed calibration statistics
            return meta.compared_outputs(gm, _forward(gm, inputs))

    @staticmethod
    def _enforce(p: Pass, context: str, error: OutputError) -> None:
        tol = getattr(p, "output_rel_tol", None)
        if tol is not None and not error.within(tol):
            raise PassError(
                f"{context} changed the outputs by {error.max_abs:.3g} ({error.max_rel:.3g} of the max |output|), "
                f"more than its tolerance {tol:g}; non-finite values: {error.nonfinite}"
            )


def _forward(gm: torch.fx.GraphModule, inputs: tuple[tuple, dict]) -> Any:
    """The graph's outputs on ``inputs``. A graph captured without weights (issue 28) runs in
    block order, loading one block's weights at a time (its logits are the loaded graph's)."""
    if gm.meta.get(meta.GM_WEIGHT_SOURCE) is None:
        return run(gm, inputs)
    args, kwargs = inputs
    if args:
        raise PassError("a graph captured without weights is checked in block order, which takes keyword inputs "
                        "only; pass the sample inputs as keywords (sample_inputs=((), {...})) or check_outputs=False")
    return run_in_block_order(gm, [kwargs]).outputs[0]
