"""Run a recipe on a captured graph: its stages around the fixed ones, data handed to the passes.

Two pass-manager runs, so the observer placement can be checked against the backend before any
calibration time is spent: prepare -> InsertObservers -> observe, then Calibrate -> finish ->
ConvertToFakeQuant. Both land in one audit trail.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.fx

from ..graph.copy import release_tensors
from ..passes.audit import AuditTrail
from ..passes.calibrate import Calibrate
from ..passes.convert_fake_quant import ConvertToFakeQuant
from ..passes.insert_observers import InsertObservers, InsertObserversPlan
from ..passes.manager import PassManager
from ..quantizers.policy import QuantPolicy
from .base import Recipe, RunContext, Stage


@dataclasses.dataclass(frozen=True)
class RecipeRun:
    graph_module: torch.fx.GraphModule  # the fake-quant graph
    audit: AuditTrail
    placement: InsertObserversPlan
    calibration_seconds: float


def run_recipe(gm: torch.fx.GraphModule, recipe: Recipe, policy: QuantPolicy,
               batches: Sequence[Mapping[str, torch.Tensor]], *, progress: bool = False,
               before_calibration: Callable[[torch.fx.GraphModule, InsertObserversPlan], None] | None = None
               ) -> RecipeRun:
    """Apply ``recipe`` with ``policy`` to ``gm`` (never mutated), calibrating on ``batches``.
    ``before_calibration(graph, placement)`` runs once the observers are in (e.g. to flag what a
    backend will not run as whole int8 GEMMs); it may raise to stop the run early."""
    context = RunContext(batches, policy, progress)
    prepared = PassManager([*recipe.build(Stage.PREPARE, context), InsertObservers(policy),
                            *recipe.build(Stage.OBSERVE, context)], progress=progress)(gm)
    placement = next(e.plan for e in prepared.audit.entries if isinstance(e.plan, InsertObserversPlan))
    if before_calibration is not None:
        before_calibration(prepared.graph_module, placement)
    finish = [Calibrate(batches, progress=progress), *recipe.build(Stage.FINISH, context), ConvertToFakeQuant(policy.weight, policy.embedding)]
    finished = PassManager(finish, progress=progress)(prepared.graph_module)
    release_tensors(prepared.graph_module)  # between the two runs: the audit keeps its nodes, not its weights
    audit = AuditTrail(prepared.audit.entries + finished.audit.entries)
    calibration_seconds = next(e.seconds for e in finished.audit.entries if e.pass_name == Calibrate.__name__)
    return RecipeRun(finished.graph_module, audit, placement, calibration_seconds)
