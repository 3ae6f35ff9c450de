"""The shape of every outlierfx pass: analyse into a plan, then apply the plan to a copy.

Modelled on ``torch.fx.passes.infra.pass_base.PassBase``: a pass is a callable
``GraphModule -> PassResult(graph_module, modified)``; ``requires``/``ensures`` state its
invariants. Unlike ``PassBase`` it never mutates its input: it works on a structural copy.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from typing import Any, ClassVar, Generic, TypeVar

import torch.fx

from ..errors import PassError
from ..graph.copy import copy_graph_module
from ..graph.shapes import propagate_values
from ..memory import heap_kept_for_reuse
from ..quantizers.observers import Observer

PlanT = TypeVar("PlanT")


@dataclasses.dataclass(frozen=True)
class PassResult:
    graph_module: torch.fx.GraphModule
    modified: bool
    plan: Any = None


def require_calibrated_observers(gm: torch.fx.GraphModule, who: str) -> None:
    """Raise :class:`~outlierfx.errors.PassError` unless ``gm`` has observers and all are calibrated."""
    observers = [m for m in gm.children() if isinstance(m, Observer)]
    if not observers or not all(o.calibrated for o in observers):
        raise PassError(f"{who} needs calibrated observers (run InsertObservers and calibrate() first)")


class GraphPass(abc.ABC, Generic[PlanT]):
    """Base class of outlierfx passes.

    Subclasses implement :meth:`analyze` (pure: returns a plan of frozen dataclasses that the
    audit trail prints and tests assert on) and :meth:`apply` (mutates the graph it is given and
    returns whether anything changed). The result is always a new GraphModule; analysis-only
    passes may annotate node meta on it and still report ``modified=False``.

    ``output_rel_tol`` declares the pass output-preserving within that fraction of the output's
    max magnitude (the pass manager checks it); ``None`` marks a pass that changes numerics on
    purpose (e.g. inserting fake quantization), whose error is recorded but not enforced.
    """

    output_rel_tol: ClassVar[float | None] = 1e-5
    trains_or_searches: ClassVar[bool] = False
    """Whether the pass runs a loop of training or search steps (allocating the same tensors
    every step): it then runs inside :func:`outlierfx.memory.heap_kept_for_reuse`."""

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def propagates_values(self) -> bool:
        """Whether new nodes get ``meta["val"]`` after :meth:`apply` (False where fake tensors
        cannot run the result, e.g. packed int8 kernels)."""
        return True

    def requires(self, gm: torch.fx.GraphModule) -> None:
        """Raise :class:`~outlierfx.errors.PassError` if ``gm`` is not a valid input."""

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        """Raise :class:`~outlierfx.errors.PassError` if the result breaks the pass's promise."""

    @abc.abstractmethod
    def analyze(self, gm: torch.fx.GraphModule) -> PlanT:
        """Decide what to change, without changing anything."""

    @abc.abstractmethod
    def apply(self, gm: torch.fx.GraphModule, plan: PlanT) -> bool:
        """Carry out ``plan`` on ``gm`` in place; return True if the graph changed."""

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        with heap_kept_for_reuse() if self.trains_or_searches else contextlib.nullcontext():
            return self._analyzed_and_applied(gm)

    def _analyzed_and_applied(self, gm: torch.fx.GraphModule) -> PassResult:
        work = copy_graph_module(gm)
        self.requires(work)
        plan = self.analyze(work)
        modified = bool(self.apply(work, plan))
        if modified:
            work.graph.lint()
            work.recompile()
            if self.propagates_values:
                propagate_values(work)  # new nodes get shapes, so passes chain without a manager
        self.ensures(work)
        return PassResult(work, modified, plan)
