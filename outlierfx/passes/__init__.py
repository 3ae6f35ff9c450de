"""Graph passes, the pass manager and its audit trail.

Each pass is usable on its own: ``result = SomePass()(gm)`` returns a
:class:`PassResult` ``(graph_module, modified, plan)`` and never mutates ``gm``.
Every pass imports from here (``from outlierfx.passes import MigrateGamma``); the names load on
first use (PEP 562), so importing this package does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module of this package that defines it
_EXPORTS: dict[str, str] = {
    # infrastructure
    "AuditEntry": "audit",
    "AuditTrail": "audit",
    "GraphDiff": "audit",
    "GraphPass": "base",
    "PassManager": "manager",
    "PassResult": "base",
    "PipelineResult": "manager",
    # passes, in recipe order
    "DetectNorms": "detect_norms",
    "MigrateGamma": "migrate_gamma",
    "RotateFFN": "rotate_ffn",
    "RotateHeads": "rotate_heads",
    "RotateResidual": "rotate_residual",
    "InsertObservers": "insert_observers",
    "GroupChannels": "group_channels",
    "Calibrate": "calibrate",
    "ClipTokenwise": "clip_tokenwise",
    "InsertQuadapter": "quadapter",
    "TrainQuadapter": "train_quadapter",
    "FoldQuadapter": "fold_quadapter",
    "LearnRanges": "learn_ranges",
    "GPTQ": "gptq",
    "QAT": "qat",
    "ConvertToFakeQuant": "convert_fake_quant",
    "FuseAttention": "fuse_attention",
    "Lower": "lower",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on demand
    from .audit import AuditEntry, AuditTrail, GraphDiff
    from .base import GraphPass, PassResult
    from .calibrate import Calibrate
    from .clip_tokenwise import ClipTokenwise
    from .convert_fake_quant import ConvertToFakeQuant
    from .detect_norms import DetectNorms
    from .fold_quadapter import FoldQuadapter
    from .fuse_attention import FuseAttention
    from .gptq import GPTQ
    from .group_channels import GroupChannels
    from .insert_observers import InsertObservers
    from .learn_ranges import LearnRanges
    from .lower import Lower
    from .manager import PassManager, PipelineResult
    from .migrate_gamma import MigrateGamma
    from .qat import QAT
    from .quadapter import InsertQuadapter
    from .rotate_ffn import RotateFFN
    from .rotate_heads import RotateHeads
    from .rotate_residual import RotateResidual
    from .train_quadapter import TrainQuadapter


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return list(__all__)
