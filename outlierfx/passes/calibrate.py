"""Calibrate: the calibration stage as an audited pass.

The recipe runner hands it the calibration batches; it feeds them through the graph's observers
(:func:`outlierfx.quantizers.calibrate.calibrate`, which names bad input) and records what it saw
in the audit trail. The graph itself does not change, and neither does the input graph: the
observers it calibrates are copies (a GraphModule copy shares its submodules).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence

import torch
import torch.fx

from ..errors import DataError
from ..quantizers.calibrate import calibrate
from ..quantizers.observers import Observer
from .base import GraphPass


@dataclasses.dataclass(frozen=True)
class CalibrationPlan:
    batches: int
    tokens: int  # real (unpadded) tokens over all batches
    observers: int

    def summary(self) -> str:
        return f"{self.observers} observers over {self.batches} batches ({self.tokens} real tokens)"


class Calibrate(GraphPass[CalibrationPlan]):
    """Run ``batches`` (dicts of keyword inputs) through the graph so its observers record ranges."""

    output_rel_tol = None  # observers pass values through; nothing to check

    def __init__(self, batches: Sequence[Mapping[str, torch.Tensor]], progress: bool = False) -> None:
        self.batches = list(batches)
        if not self.batches:
            raise DataError("the calibration set is empty")
        self.progress = progress

    def analyze(self, gm: torch.fx.GraphModule) -> CalibrationPlan:
        observers = sum(1 for m in gm.children() if isinstance(m, Observer))
        return CalibrationPlan(len(self.batches), sum(_real_tokens(b) for b in self.batches), observers)

    def apply(self, gm: torch.fx.GraphModule, plan: CalibrationPlan) -> bool:
        for name, module in list(gm.named_children()):
            if isinstance(module, Observer):
                setattr(gm, name, copy.deepcopy(module))  # fresh statistics, the input graph's untouched
        calibrate(gm, self.batches, progress=self.progress)  # its time is the audit entry's
        return False  # same graph, same outputs: only the observers' statistics changed


def _real_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if isinstance(mask, torch.Tensor):
        return int(mask.sum())
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    return int(ids.numel()) if isinstance(ids, torch.Tensor) else 0
