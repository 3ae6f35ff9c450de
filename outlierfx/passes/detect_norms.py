"""DetectNorms: find every LayerNorm / RMSNorm site and classify how its output is consumed.

A site's gamma can migrate out of the norm when every consumer can take it:
- a Linear reading the norm output as its input absorbs gamma into its weight columns;
- a residual add reading it as the shortcut (post-LN, BERT) or the graph output gets an explicit
  per-channel multiply on that edge.
Anything else (a non-linear op, a Linear reading it as a weight...) blocks migration, and the
plan says which consumer and why. Matching is structural (see ``outlierfx.graph.view``).
"""

from __future__ import annotations

import dataclasses
import enum

import torch.fx

from ..graph import meta
from ..graph.ops import OpKind, is_kind, tensor_val
from ..graph.view import GraphView
from .base import GraphPass


class NormPlacement(enum.Enum):
    POST_LN = "post-LN"  # output also carried on the residual stream (BERT)
    PRE_LN = "pre-LN"  # output feeds only the sublayer; the residual stream bypasses it (GPT-2, Llama)
    FINAL = "final"  # the last norm before the head / graph output


@dataclasses.dataclass(frozen=True)
class NormSitePlan:
    norm: torch.fx.Node
    kind: OpKind
    placement: NormPlacement
    hidden_size: int
    gamma: torch.fx.Node | None  # get_attr of the gain, None when the norm has no gamma
    beta: torch.fx.Node | None
    linears: tuple[torch.fx.Node, ...]
    scaled_edges: tuple[tuple[torch.fx.Node, torch.fx.Node], ...]  # (consumer, operand) needing x*gamma
    fed_by_residual: bool  # the normalized tensor is a residual sum
    blocker: str | None  # why gamma cannot migrate, None when it can

    @property
    def absorbable(self) -> bool:
        return self.blocker is None


@dataclasses.dataclass(frozen=True)
class DetectNormsPlan:
    sites: tuple[NormSitePlan, ...]
    residual_adds: tuple[torch.fx.Node, ...]

    def summary(self) -> str:
        by_place: dict[str, int] = {}
        for s in self.sites:
            by_place[s.placement.value] = by_place.get(s.placement.value, 0) + 1
        places = ", ".join(f"{n} {p}" for p, n in by_place.items())
        lines = [f"{len(self.sites)} norm sites ({places}); {sum(s.absorbable for s in self.sites)} can absorb "
                 f"gamma; {len(self.residual_adds)} residual adds"]
        lines += [f"blocked: {meta.module_path(s.norm) or s.norm.name}: {s.blocker}" for s in self.sites if s.blocker]
        return "\n".join(lines)


def analyze_norm_sites(gm: torch.fx.GraphModule, view: GraphView | None = None) -> DetectNormsPlan:
    view = view or GraphView(gm)
    residual_adds = {r.add for r in view.residual_adds}
    plans = []
    for site in view.norm_sites:
        norm = site.norm
        gamma, beta = _affine_params(norm)
        scaled = [(add, site.operand(add)) for add in site.residual_adds]
        blocker = None
        for other in site.others:
            if other.op == "output":
                scaled.append((other, site.operand(other)))
            elif blocker is None:
                op = other.target if other.op == "call_function" else other.op
                where = meta.module_path(other) or other.name
                blocker = f"consumer {other.name} ({op} in {where}) cannot absorb a per-channel scale"
        if gamma is None:
            blocker = "the norm has no gamma (elementwise_affine=False)"
        elif gamma.op != "get_attr":
            blocker = f"gamma is computed ({gamma.name}), not a parameter"
        if site.is_post_ln:
            placement = NormPlacement.POST_LN
        elif norm is view.norm_sites[-1].norm:
            placement = NormPlacement.FINAL
        else:
            placement = NormPlacement.PRE_LN
        val = tensor_val(norm)
        plans.append(
            NormSitePlan(
                norm=norm,
                kind=site.kind,
                placement=placement,
                hidden_size=int(val.shape[-1]) if val is not None else -1,
                gamma=gamma,
                beta=beta,
                linears=site.linears,
                scaled_edges=tuple(scaled),
                fed_by_residual=site.source in residual_adds,
                blocker=blocker,
            )
        )
    return DetectNormsPlan(tuple(plans), tuple(r.add for r in view.residual_adds))


def _affine_params(norm: torch.fx.Node) -> tuple[torch.fx.Node | None, torch.fx.Node | None]:
    def arg(i: int, name: str) -> object:
        return norm.args[i] if len(norm.args) > i else norm.kwargs.get(name)

    gamma = arg(2, "weight")
    beta = arg(3, "bias") if is_kind(norm, OpKind.LAYER_NORM) else None
    return (gamma if isinstance(gamma, torch.fx.Node) else None, beta if isinstance(beta, torch.fx.Node) else None)


class DetectNorms(GraphPass[DetectNormsPlan]):
    """Annotates each norm node with its :class:`NormSitePlan`; never changes the graph."""

    def analyze(self, gm: torch.fx.GraphModule) -> DetectNormsPlan:
        return analyze_norm_sites(gm)

    def apply(self, gm: torch.fx.GraphModule, plan: DetectNormsPlan) -> bool:
        for site in plan.sites:
            site.norm.meta[meta.NORM_ROLE] = site
        return False
