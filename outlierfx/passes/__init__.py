"""Graph passes, the pass manager and its audit trail.

Each pass is usable on its own: ``result = SomePass()(gm)`` returns a
:class:`PassResult` ``(graph_module, modified, plan)`` and never mutates ``gm``.
"""

from .audit import AuditEntry, AuditTrail, GraphDiff
from .base import GraphPass, PassResult
from .manager import PassManager, PipelineResult

__all__ = ["AuditEntry", "AuditTrail", "GraphDiff", "GraphPass", "PassManager", "PassResult", "PipelineResult"]
