"""MigrateGamma (Outlier Suppression, Wei et al. 2022): move LayerNorm/RMSNorm gamma out of the norm.

LN(x) = gamma * xhat + beta becomes LN'(x) = xhat + beta / gamma, and gamma moves into every
consumer: each Linear reading the norm output gets W * diag(gamma); a residual shortcut or graph
output reading it gets an explicit ``* gamma`` on that edge (post-LN models). RMSNorm has no
beta. The quantizer that later sits on the norm output sees LN'(x), without gamma's
amplification of outlier channels. Exact in real arithmetic; in fp32 the outputs agree to
rounding.

Channels where dividing by gamma is unsafe stay in the norm (their migration factor is 1): gamma
exactly zero or below ``min_gamma_ratio`` of the largest |gamma|, and channels whose shifted
offset |beta / gamma| would exceed ``max_offset`` (a new outlier made by the migration itself).
The plan lists them. A norm whose consumers cannot absorb a per-channel scale is left alone,
with the reason (see :mod:`.detect_norms`).

On a graph captured without weights (issue 28) the pass reads the gains it needs
(:func:`~outlierfx.graph.weight_source.value_of`) and records each rewritten tensor, computed
when a block loads it (:func:`~outlierfx.graph.weight_source.rewrite_input_tensor`), so the
result equals the full-memory migration bit for bit without loading any weight matrix.

``channels="amplifying"`` (an outlierfx extension, not in the paper) migrates only channels
whose |gamma| > 1. Where gamma *damps* an outlier channel of xhat (|gamma| < 1), full migration
widens the norm output's range; MiniLM's FFN-output LayerNorms are such a case (see README).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from ..errors import PassError
from ..graph import meta
from ..graph.attrs import is_shared_attr, set_attr, unique_attr_name
from ..graph.weight_source import rewrite_input_tensor, value_of
from ..graph.ops import aten
from .base import GraphPass
from .detect_norms import NormSitePlan, analyze_norm_sites

NAME = "MigrateGamma"


@dataclasses.dataclass(frozen=True)
class GammaMigration:
    site: NormSitePlan
    kept_channels: tuple[int, ...]  # gamma stays in the norm for these (see module docstring)
    tied_weights: tuple[str, ...]  # consumer weights shared with another op: migrated copy stored apart


@dataclasses.dataclass(frozen=True)
class MigrateGammaPlan:
    migrations: tuple[GammaMigration, ...]
    skipped: tuple[tuple[torch.fx.Node, str], ...]  # (norm, reason)
    min_gamma_ratio: float
    max_offset: float
    channels: str

    def summary(self) -> str:
        total = len(self.migrations) + len(self.skipped)
        linears = sum(len(m.site.linears) for m in self.migrations)
        edges = sum(len(m.site.scaled_edges) for m in self.migrations)
        lines = [f"migrated gamma at {len(self.migrations)}/{total} norm sites into {linears} linears "
                 f"and {edges} explicit per-channel multiplies"]
        for m in self.migrations:
            if m.kept_channels:
                shown = list(m.kept_channels[:12]) + (["..."] if len(m.kept_channels) > 12 else [])
                why = "|gamma| <= 1, zero/tiny gamma" if self.channels == "amplifying" else "zero/tiny gamma"
                lines.append(f"{meta.module_path(m.site.norm)}: {len(m.kept_channels)} channels {shown} keep gamma in "
                             f"the norm ({why} or |beta/gamma| > {self.max_offset:g})")
            if m.tied_weights:
                lines.append(f"{meta.module_path(m.site.norm)}: tied weights {list(m.tied_weights)} untied")
        lines += [f"skipped {meta.module_path(n) or n.name}: {why}" for n, why in self.skipped]
        return "\n".join(lines)


class MigrateGamma(GraphPass[MigrateGammaPlan]):
    """Migrate every absorbable norm's gamma into its consumers (see module docstring)."""

    def __init__(self, min_gamma_ratio: float = 1e-3, max_offset: float = 8.0, channels: str = "all") -> None:
        if channels not in ("all", "amplifying"):
            raise ValueError(f"channels must be 'all' or 'amplifying', got {channels!r}")
        self.channels = channels
        if not 0 <= min_gamma_ratio < 1:
            raise ValueError(f"min_gamma_ratio must be in [0, 1), got {min_gamma_ratio}")
        if max_offset <= 0:
            raise ValueError(f"max_offset must be positive, got {max_offset}")
        self.min_gamma_ratio = min_gamma_ratio
        self.max_offset = max_offset

    def analyze(self, gm: torch.fx.GraphModule) -> MigrateGammaPlan:
        migrations, skipped = [], []
        for site in analyze_norm_sites(gm).sites:
            if site.blocker is not None:
                skipped.append((site.norm, site.blocker))
                continue
            if not site.linears and not site.scaled_edges:
                skipped.append((site.norm, "the norm output has no consumers"))
                continue
            gamma = value_of(gm, str(site.gamma.target))
            if not torch.isfinite(gamma).all():
                skipped.append((site.norm, "gamma contains NaN or inf"))
                continue
            kept = self._kept_channels(gm, site, gamma)
            if len(kept) == gamma.numel():
                skipped.append((site.norm, "no channel qualifies for migration (see the thresholds)"))
                continue
            tied = tuple(str(lin.args[1].target) for lin in site.linears if is_shared_attr(gm, lin.args[1]))
            migrations.append(GammaMigration(site, kept, tied))
        return MigrateGammaPlan(tuple(migrations), tuple(skipped), self.min_gamma_ratio, self.max_offset, self.channels)

    def _kept_channels(self, gm: torch.fx.GraphModule, site: NormSitePlan, gamma: torch.Tensor) -> tuple[int, ...]:
        magnitude = gamma.abs()
        keep = magnitude <= self.min_gamma_ratio * magnitude.max()
        if self.channels == "amplifying":
            keep |= magnitude <= 1.0
        if site.beta is not None:
            beta = value_of(gm, str(site.beta.target))
            offset = beta.abs() / magnitude.clamp_min(torch.finfo(gamma.dtype).tiny)
            keep |= offset > self.max_offset
        return tuple(int(i) for i in torch.nonzero(keep).flatten())

    def apply(self, gm: torch.fx.GraphModule, plan: MigrateGammaPlan) -> bool:
        for migration in plan.migrations:
            self._migrate(gm, migration)
        return bool(plan.migrations)

    @staticmethod
    def _migrate(gm: torch.fx.GraphModule, migration: GammaMigration) -> None:
        site = migration.site
        norm = site.norm
        gamma = value_of(gm, str(site.gamma.target))
        factor = gamma.clone()  # what leaves the norm, per channel
        kept = list(migration.kept_channels)
        factor[kept] = 1.0
        if (factor == 0).any():
            raise PassError(f"{meta.module_path(norm)}: zero migration factor (gamma zeros not kept)")

        # The norm: gamma / factor (1 where migrated), beta / factor.
        args = list(norm.args)
        # (each tensor through rewrite_input_tensor: on a graph captured without weights, the
        # rewrite is computed when a block loads the tensor; ``factor`` lives in the closures)
        if kept:
            rewrite_input_tensor(gm, norm, site.gamma, lambda g: g / factor, f"{NAME}: gamma / factor", "_migrated")
        else:
            args[2] = None
        norm.args = tuple(args)
        if site.beta is not None:
            rewrite_input_tensor(gm, norm, site.beta, lambda b: b / factor, f"{NAME}: beta / factor", "_migrated")

        # Linears: scale input columns.
        for linear in site.linears:
            rewrite_input_tensor(gm, linear, linear.args[1], lambda w: w * factor.to(w.dtype),
                                 f"{NAME}: W diag(factor)", "_migrated", lambda w: w.mul_(factor.to(w.dtype)))

        # Shortcut / output edges: an explicit per-channel multiply.
        if site.scaled_edges:
            target = unique_attr_name(gm, f"{site.gamma.target}_shortcut_scale")
            set_attr(gm, target, factor)
            with gm.graph.inserting_after(norm):
                scale = gm.graph.get_attr(target)
            meta.inherit(scale, norm, NAME)
            for consumer, operand in site.scaled_edges:
                with gm.graph.inserting_before(consumer):
                    scaled = gm.graph.call_function(aten.mul.Tensor, (operand, scale))
                meta.inherit(scaled, norm, NAME)
                consumer.replace_input_with(operand, scaled)
        _drop_if_unused(gm, site.gamma)


def _drop_if_unused(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    if not node.users:
        gm.graph.erase_node(node)

