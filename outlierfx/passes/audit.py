"""The audit trail: what each pass planned, which nodes it touched, and the numeric certificate."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from typing import Any

import torch
import torch.fx

from ..graph import meta
from ..graph.compare import OutputError
from .check_sample import CheckSample


def to_jsonable(obj: Any) -> Any:
    """Render plans (frozen dataclasses holding fx Nodes, enums, tensors) as plain JSON data."""
    if isinstance(obj, torch.fx.Node):
        path = meta.module_path(obj)
        return f"{obj.name} ({path})" if path else obj.name
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist() if obj.numel() <= 16 else {"shape": list(obj.shape), "dtype": str(obj.dtype)}
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


@dataclasses.dataclass(frozen=True)
class GraphDiff:
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]  # same name, different op/target/args

    @staticmethod
    def between(before: torch.fx.Graph, after: torch.fx.Graph) -> GraphDiff:
        def signature(graph: torch.fx.Graph) -> dict[str, str]:
            return {n.name: f"{n.op}|{n.target}|{n.args}|{n.kwargs}" for n in graph.nodes}

        old, new = signature(before), signature(after)
        return GraphDiff(
            added=tuple(n for n in new if n not in old),
            removed=tuple(n for n in old if n not in new),
            changed=tuple(n for n in new if n in old and new[n] != old[n]),
        )


@dataclasses.dataclass(frozen=True)
class AuditEntry:
    pass_name: str
    modified: bool
    plan: Any
    diff: GraphDiff
    error_vs_previous: OutputError | None
    error_vs_reference: OutputError | None
    seconds: float
    checked_on: CheckSample | None = None  # the example's sequences the errors were measured on

    def as_dict(self) -> dict[str, Any]:
        return {
            "pass": self.pass_name,
            "modified": self.modified,
            "plan": to_jsonable(self.plan),
            "nodes_added": list(self.diff.added),
            "nodes_removed": list(self.diff.removed),
            "nodes_changed": list(self.diff.changed),
            "error_vs_previous": self.error_vs_previous.as_dict() if self.error_vs_previous else None,
            "error_vs_reference": self.error_vs_reference.as_dict() if self.error_vs_reference else None,
            "seconds": self.seconds,
            "checked_on": self.checked_on.as_dict() if self.checked_on else None,
        }


@dataclasses.dataclass(frozen=True)
class AuditTrail:
    entries: tuple[AuditEntry, ...] = ()

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def appended(self, entry: AuditEntry) -> AuditTrail:
        return AuditTrail(self.entries + (entry,))

    def as_dict(self) -> dict[str, Any]:
        return {"passes": [e.as_dict() for e in self.entries]}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.as_dict(), indent=indent)

    def to_text(self) -> str:
        lines = []
        for i, e in enumerate(self.entries, 1):
            status = "modified" if e.modified else "no change"
            err = ""
            if e.error_vs_previous is not None:
                err = f"; max |error| vs previous {e.error_vs_previous.max_abs:.3g} (rel {e.error_vs_previous.max_rel:.2g})"
            if e.error_vs_reference is not None:
                err += f", vs original {e.error_vs_reference.max_abs:.3g} (rel {e.error_vs_reference.max_rel:.2g})"
            if e.checked_on is not None and not e.checked_on.whole_example:
                err += f" on {e.checked_on.describe()}"
            lines.append(
                f"{i}. {e.pass_name}: {status}, +{len(e.diff.added)} -{len(e.diff.removed)} "
                f"~{len(e.diff.changed)} nodes, {e.seconds:.2f}s{err}"
            )
            summary = getattr(e.plan, "summary", None)
            if callable(summary):
                lines.extend("   " + line for line in str(summary()).splitlines())
        return "\n".join(lines) if lines else "(no passes ran)"
