"""InsertObservers: put an observer on every activation the policy quantizes.

One observer per tensor (a norm output feeding Q, K and V is observed once), inserted right
after its producer so that every consumer reads the same quantized value, as on an integer
backend; a tensor the policy quantizes only as a Linear input (``linear-inputs``) is read
quantized by its Linears only, and in float by the rest (a post-LN residual shortcut), as an
int8 GEMM backend computes it. Only floating-point tensors are observed (never integer
position ids or masks).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from ..graph import meta
from ..graph.ops import OpKind, op_kind, preserves_last_axis
from ..graph.roles import Role, tensor_roles
from ..graph.view import GraphView
from ..quantizers.observers import Observer
from ..quantizers.policy import QuantPolicy, make_policy
from ..quantizers.spec import QuantSpec
from .base import GraphPass

OBSERVER_PREFIX = "outlierfx_observer_"


@dataclasses.dataclass(frozen=True)
class QuantPoint:
    node: torch.fx.Node
    roles: frozenset[Role]
    spec: QuantSpec | None  # None: kept in float by the policy
    reason: str | None  # why the spec differs from the policy's default


@dataclasses.dataclass(frozen=True)
class InsertObserversPlan:
    policy: str
    points: tuple[QuantPoint, ...]

    def summary(self) -> str:
        observed = [p for p in self.points if p.spec is not None]
        counts: dict[str, int] = {}
        for p in observed:
            for r in p.roles:
                counts[r.value] = counts.get(r.value, 0) + 1
        lines = [f"policy {self.policy}: {len(observed)} activation observers ("
                 + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ")"]
        kept = sum(1 for p in self.points if p.reason and p.spec is None)
        wide = sum(1 for p in self.points if p.reason and p.spec is not None)
        if kept:
            lines.append(f"{kept} role-bearing tensors kept float by the policy (listed in the report)")
        if wide:
            lines.append(f"{wide} tensors at another width than the default (listed in the report)")
        return "\n".join(lines)


class InsertObservers(GraphPass[InsertObserversPlan]):
    output_rel_tol = 0.0  # observers return their input: outputs must be bit-identical

    def __init__(self, policy: QuantPolicy | str = "full") -> None:
        self.policy = make_policy(policy) if isinstance(policy, str) else policy

    def analyze(self, gm: torch.fx.GraphModule) -> InsertObserversPlan:
        points = []
        outputs = _graph_outputs(gm)
        for node, roles in tensor_roles(GraphView(gm)).items():
            if node in outputs and not self.policy.quantize_outputs:
                spec, reason = None, "model output: read in float outside the graph, quantizing it saves nothing"
            elif self.policy.observed(roles):
                spec, reason = self.policy.spec_for(roles)
            else:
                names = ", ".join(sorted(r.value for r in roles))
                spec, reason = None, f"policy {self.policy.name} does not quantize {names}"
            points.append(QuantPoint(node, roles, spec, reason))
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        return InsertObserversPlan(self.policy.name, tuple(sorted(points, key=lambda p: order[p.node])))

    def apply(self, gm: torch.fx.GraphModule, plan: InsertObserversPlan) -> bool:
        for point in plan.points:
            if point.spec is None:
                continue
            name = OBSERVER_PREFIX + point.node.name
            gm.add_module(name, Observer(point.spec, meta.module_path(point.node) or point.node.name, point.roles))
            users = list(point.node.users)
            if self.policy.linear_readers_only(point.roles):
                users = [u for u in users if op_kind(u) is OpKind.LINEAR and u.args[0] is point.node]
            with gm.graph.inserting_after(point.node):
                observed = gm.graph.call_module(name, (point.node,))
            meta.inherit(observed, point.node, type(self).__name__)
            observed.meta["val"] = point.node.meta.get("val")
            for user in users:
                user.replace_input_with(point.node, observed)
        return any(p.spec is not None for p in plan.points)


def _graph_outputs(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """Nodes whose value is returned by the graph (directly or through layout-only ops)."""
    found, stack = set(), list(gm.graph.output_node().all_input_nodes)
    while stack:
        node = stack.pop()
        found.add(node)
        if node.op == "call_function" and node.args and isinstance(node.args[0], torch.fx.Node) \
                and preserves_last_axis(node, node.args[0]):
            stack.append(node.args[0])
    return found


def observers(gm: torch.fx.GraphModule) -> dict[str, Observer]:
    return {name: m for name, m in gm.named_children() if isinstance(m, Observer)}
