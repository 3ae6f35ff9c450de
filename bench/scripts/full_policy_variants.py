"""Variants of ``best`` under the ``full`` policy (issue 5's setting: every activation quantized,
static per tensor outside PEG groups), to see whether any part of it is what misses the targets.

    .venv/bin/python bench/scripts/full_policy_variants.py --model minilm --recipes quadapter-peg,best-res96 \
        --json bench/results/minilm/accuracy-full-variants.json
    .venv/bin/python bench/scripts/full_policy_variants.py --model smollm2 --recipes best-res96+sink \
        --json bench/results/smollm2/accuracy-full-variants.json

Variants (each with MSE-clipped weight rows rounded by GPTQ, as ``best``):

- ``quadapter-peg``: Quadapter scales at the norm -> Linear edges (SmoothQuant init, alpha=0.8,
  trained block-wise, folded; as ``smooth-peg``) and K=24 range-sized PEG groups on every other
  channel-axis activation (residual sums, Linear inputs and outputs, embedding sum);
- ``best-res96`` / ``best-res-channel``: ``best`` with the residual sums and the embedding sum
  split into 96 range-sized groups / one range per channel, K=24 elsewhere;
- ``best-k48``: ``best`` with 48 groups everywhere;
- ``migrate``: gamma migration alone (``os`` without token-wise clipping), to tell the two apart;
- ``os-global`` / ``os+peg-global``: ``os`` / ``os+peg`` with the coarse stage only (one alpha
  for every quantizer, as the reference implementation), 12 evaluations instead of ~1,500 per-block
  ones (on SmolLM2 the per-block search takes over an hour on 2 cores under ``full``).

Suffixes (``+sink``, ``+lsq``) work as on registered recipes. Rows as ``outlierfx bench accuracy``.
"""

from __future__ import annotations

import argparse
import dataclasses

from outlierfx import benchmarks
from outlierfx.graph.roles import Role
from outlierfx.passes.clip_tokenwise import ClipTokenwise
from outlierfx.passes.group_channels import CHANNEL_ROLES, GroupChannels
from outlierfx.quantizers.spec import Estimator
from outlierfx.recipes import (FINE_SUFFIX, GPTQ_SUFFIX, RECIPES, SINK_SUFFIX, Need, Recipe, Step, step,
                               with_fine_stage, with_gptq, with_sink_token)
from outlierfx.recipes.papers import MIGRATE, gptq_step, quadapter_steps

RESIDUAL = frozenset({Role.RESIDUAL_SUM, Role.EMBEDDING_SUM})
PEG24 = step(GroupChannels, groups=24, roles=CHANNEL_ROLES, grouping="range")
# ClipTokenwise's coarse stage only: one alpha for every quantizer
GLOBAL_CLIP = step(ClipTokenwise, {"batches": Need.BATCHES, "progress": Need.PROGRESS}, per_block=False)


def _best_with(name: str, groups: str, *observe: Step) -> Recipe:
    """``best`` (its MSE weight rows and GPTQ kept) with other PEG groups."""
    return dataclasses.replace(RECIPES["best"], name=name, observe=observe, description=f"best with {groups}")


class GroupResidualChannels(GroupChannels):
    """GroupChannels under a name of its own: a recipe runs each pass type once, and these variants group
    the residual stream before (so apart from) the other channel-axis activations."""


def _residual_groups(groups: int | None) -> tuple[Step, Step]:
    """``groups`` range-sized groups (None: one per channel) on the residual and embedding sums, K=24 elsewhere
    (GroupChannels leaves alone the observers an earlier grouping took)."""
    return (step(GroupResidualChannels, groups=groups, roles=RESIDUAL, grouping="range" if groups else "equal"),
            PEG24)


def _global_clip(base: str, name: str) -> Recipe:
    recipe = RECIPES[base]
    return dataclasses.replace(recipe, name=name, description=f"{recipe.description}, coarse stage only",
                               finish=(GLOBAL_CLIP,))


VARIANTS = {r.name: r for r in (
    # as smooth-peg (Quadapter scales with the SmoothQuant init, alpha=0.8, MSE weight rows, GPTQ), K=24 PEG
    Recipe("quadapter-peg", "Quadapter at norm -> Linear edges, K=24 PEG on every other channel-axis activation",
           observe=(step(GroupChannels, groups=24, roles=CHANNEL_ROLES, grouping="range",
                         exclude_roles=frozenset({Role.NORM_OUTPUT})),),
           finish=(*quadapter_steps(init="smoothquant", alpha=0.8), gptq_step()), weight_estimator=Estimator.MSE),
    _best_with("best-res96", "K=96 on the residual and embedding sums", *_residual_groups(96)),
    _best_with("best-res-channel", "a range per channel on the residual and embedding sums", *_residual_groups(None)),
    _best_with("best-k48", "K=48 everywhere", step(GroupChannels, groups=48, roles=CHANNEL_ROLES, grouping="range")),
    Recipe("migrate", "gamma migration alone", prepare=(MIGRATE,)),
    _global_clip("os", "os-global"),
    _global_clip("os+peg", "os+peg-global"),
)}
SUFFIXES = {FINE_SUFFIX: with_fine_stage, GPTQ_SUFFIX: with_gptq, SINK_SUFFIX: with_sink_token}


def variant(name: str) -> Recipe | str:
    """A variant with suffixes applied left to right (``best-res96+sink``), else ``name`` as given (a
    registered recipe or preset, which :func:`outlierfx.benchmarks.accuracy` resolves)."""
    if name in VARIANTS:
        return VARIANTS[name]
    for suffix, add in SUFFIXES.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            base = variant(name[: -len(suffix)])
            if isinstance(base, Recipe):
                return add(base, name=name)
    return name


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--recipes", required=True, help=f"comma-separated: {', '.join(VARIANTS)} (and suffixes)")
    parser.add_argument("--bits", nargs="+", default=["W8A8"])
    parser.add_argument("--json")
    args = parser.parse_args()
    benchmarks.show_and_write(benchmarks.accuracy(args.model, args.bits, [variant(n) for n in args.recipes.split(",")],
                                                  policy="full"), args.json)


if __name__ == "__main__":
    main()
