"""FoldQuadapter: the learned Quadapter scales become constants of the model (see :mod:`.quadapter`).

s goes into the norm's gamma and beta, 1/s into the consuming Linears' input columns (tied
weights are untied, as in gamma migration); a post-LN shortcut keeps an explicit per-channel
multiply by 1/s. An explicit site's s goes into an upstream Linear's output rows where that is
exact, else it stays a multiply by a constant before its quantizer. No learnable node is left.

Every rewritten weight is computed by :func:`~outlierfx.graph.weight_source.rewrite_input_tensor`:
at once on a graph holding its weights, and on one captured without weights
(``low_memory=True``) when a block loads it, by the same function, so both hold the same tensor.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from ..graph import meta
from ..graph.attrs import del_attr, fetch_attr, is_shared_attr, set_attr, unique_attr_name
from ..graph.weight_source import rewrite_input_tensor
from .base import GraphPass
from .detect_norms import _affine_params
from .quadapter import NAME, SCALE_PREFIX, ScaleSite, inserted_sites
from .scale_upstream import row_scalable_linear, scale_rows, verify_row_folds


@dataclasses.dataclass(frozen=True)
class FoldQuadapterPlan:
    folded: tuple[tuple[str, str, int], ...]  # (scale attribute, norm module path, linears)
    compensations: int
    tied_weights: tuple[str, ...]
    explicit: tuple[tuple[str, str, int], ...] = ()  # (scale attribute, producer, linears): x * s kept
    # (scale attribute, producer, upstream Linear's module path, its node): s went into that
    # Linear's output rows instead
    into_rows: tuple[tuple[str, str, str, str], ...] = ()

    def summary(self) -> str:
        line = (f"folded {len(self.folded)} Quadapter scale vectors into norm gamma/beta and "
                f"{sum(n for _, _, n in self.folded + self.explicit)} Linear weights; {self.compensations} explicit "
                f"shortcut/output multiplies by 1/s")
        if self.into_rows:
            line += f"; {len(self.into_rows)} scales folded into the output rows of an upstream Linear"
        kept = len(self.explicit) - len(self.into_rows)
        if kept:
            line += f"; {kept} scales stay as constant multiplies before their quantizers"
        if self.tied_weights:
            line += f"; untied {list(self.tied_weights)}"
        return line


class FoldQuadapter(GraphPass[FoldQuadapterPlan]):
    """s into the norm's gamma and beta, 1/s into the consuming Linears' input columns."""

    output_rel_tol = 1e-5

    def analyze(self, gm: torch.fx.GraphModule) -> FoldQuadapterPlan:
        folded, explicit, tied, comps = [], [], [], 0
        sites = inserted_sites(gm)
        rows = self._upstream_folds(gm, [s for s in sites if s.explicit])
        for site in sites:
            where = meta.module_path(site.producer) or site.producer.name
            (explicit if site.explicit else folded).append((site.target, where, len(site.weight_muls)))
            comps += len(site.compensations)
            for mul in site.weight_muls:
                weight = mul.args[0]
                if is_shared_attr(gm, weight):
                    tied.append(str(weight.target))
        into_rows = tuple((site.target, meta.module_path(site.producer) or site.producer.name,
                           meta.module_path(linear) or linear.name, linear.name) for site, linear in rows.values())
        return FoldQuadapterPlan(tuple(folded), comps, tuple(tied), tuple(explicit), into_rows)

    @staticmethod
    def _upstream_folds(gm: torch.fx.GraphModule, sites: list[ScaleSite]) -> dict[str, tuple[ScaleSite, torch.fx.Node]]:
        """Explicit sites whose s can go into an upstream Linear's output rows, checked on the
        example inputs (see :mod:`.scale_upstream`)."""
        inputs = gm.meta.get(meta.GM_EXAMPLE_INPUTS)
        if inputs is None:
            return {}
        candidates = {}
        for site in sites:
            linear = row_scalable_linear(site.operand, int(fetch_attr(gm, site.target).shape[0]))
            if linear is not None:
                candidates[site.target] = (site.input_mul, linear, torch.exp(fetch_attr(gm, site.target).detach()))
        good = verify_row_folds(gm, candidates, inputs)
        by_target = {s.target: s for s in sites}
        return {t: (by_target[t], candidates[t][1]) for t in candidates if t in good}

    def apply(self, gm: torch.fx.GraphModule, plan: FoldQuadapterPlan) -> bool:
        graph = gm.graph
        upstream = {t: node for t, _, _, node in plan.into_rows}  # scale attribute -> Linear node
        row_scales: list[tuple[str, torch.Tensor]] = []  # (upstream Linear node, s)
        for site in inserted_sites(gm):
            log_s = fetch_attr(gm, site.target).detach()
            scale = torch.exp(log_s)  # the same ops as the graph's, so the folded values are identical
            inverse = torch.reciprocal(scale)
            producer = site.producer  # before the fold erases x * s
            if site.target in upstream:  # s goes into the upstream Linear's rows, after this loop
                row_scales.append((upstream[site.target], scale))
                site.input_mul.replace_all_uses_with(site.operand)
                graph.erase_node(site.input_mul)
            elif site.explicit:  # x * s stays, with s a constant
                self._constant(gm, site.target, producer, "outlierfx_quadapter_scale_", scale, site.scale)
            else:
                self._fold_into_norm(gm, site, scale)
            for mul in site.weight_muls:
                weight = mul.args[0]
                (linear,) = mul.users
                linear.replace_input_with(mul, weight)
                graph.erase_node(mul)
                rewrite_input_tensor(gm, linear, weight, lambda w, inverse=inverse: w * inverse,
                                     "FoldQuadapter: W (1/s) on the input columns", "_quadapter",
                                     lambda w, inverse=inverse: w.mul_(inverse))
                if not weight.users:
                    graph.erase_node(weight)
            if site.compensations:
                self._constant(gm, site.target, producer, "outlierfx_quadapter_inverse_", inverse, site.inverse)
            for node in (site.inverse, site.scale, site.log_scale):
                graph.erase_node(node)
            del_attr(gm, site.target)
        # once every 1/s is in its Linear's columns, the upstream weights are stored tensors
        by_name = {n.name: n for n in graph.nodes}
        for name, scale in row_scales:
            scale_rows(gm, by_name[name], scale, "_quadapter")
        return bool(plan.folded or plan.explicit)

    @staticmethod
    def _constant(gm: torch.fx.GraphModule, scale_target: str, producer: torch.fx.Node, prefix: str,
                  value: torch.Tensor, replaces: torch.fx.Node) -> None:
        """Every reader of ``replaces`` reads the stored ``value`` instead."""
        target = unique_attr_name(gm, prefix + scale_target[len(SCALE_PREFIX):])
        set_attr(gm, target, value)
        with gm.graph.inserting_before(replaces):
            constant = gm.graph.get_attr(target)
        meta.inherit(constant, producer, NAME)
        replaces.replace_all_uses_with(constant)

    @staticmethod
    def _fold_into_norm(gm: torch.fx.GraphModule, site: ScaleSite, scale: torch.Tensor) -> None:
        """s into the norm's gamma (created if it has none) and beta; the multiply x * s goes."""
        norm = site.producer
        gamma, beta = _affine_params(norm)
        if gamma is not None:
            rewrite_input_tensor(gm, norm, gamma, lambda g: g * scale, "FoldQuadapter: gamma s", "_quadapter")
        else:  # no gamma (e.g. fully migrated by MigrateGamma): s becomes the norm's gamma
            target = unique_attr_name(gm, "outlierfx_quadapter_gamma_" + site.target[len(SCALE_PREFIX):])
            set_attr(gm, target, torch.nn.Parameter(scale, requires_grad=False))
            with gm.graph.inserting_before(norm):
                new_gamma = gm.graph.get_attr(target)
            meta.inherit(new_gamma, norm, NAME)
            norm.args = (*norm.args[:2], new_gamma, *norm.args[3:])
        if beta is not None:
            rewrite_input_tensor(gm, norm, beta, lambda b: b * scale, "FoldQuadapter: beta s", "_quadapter")
        site.input_mul.replace_all_uses_with(site.operand)
        gm.graph.erase_node(site.input_mul)
