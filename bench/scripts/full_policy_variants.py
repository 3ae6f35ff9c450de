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
from outlierfx.passes import recipes
from outlierfx.passes.clip_tokenwise import ClipTokenwise
from outlierfx.passes.group_channels import CHANNEL_ROLES, GroupChannels
from outlierfx.passes.migrate_gamma import MigrateGamma

RESIDUAL = frozenset({Role.RESIDUAL_SUM, Role.EMBEDDING_SUM})


def _best_with(name: str, observe) -> recipes.Recipe:  # type: ignore[no-untyped-def]
    return recipes.with_gptq(dataclasses.replace(recipes.RECIPES["best"], name=name, observe=observe), name=name)


def _residual_groups(groups: int | None):  # type: ignore[no-untyped-def]
    return lambda: [GroupChannels(groups=groups, roles=RESIDUAL, grouping="range" if groups else "equal"),
                    GroupChannels(groups=24, roles=CHANNEL_ROLES, grouping="range")]


def _global_clip(batches, _policy, progress=False):  # type: ignore[no-untyped-def]
    return [ClipTokenwise(batches, per_block=False, progress=progress)]


VARIANTS = {
    "quadapter-peg": dataclasses.replace(recipes._smooth_family(
        "quadapter-peg", "Quadapter at norm -> Linear edges, K=24 PEG on every other channel-axis activation",
        observe=lambda: [GroupChannels(groups=24, roles=CHANNEL_ROLES, grouping="range",
                                       exclude_roles=frozenset({Role.NORM_OUTPUT}))]), default_policy="full"),
    "best-res96": _best_with("best-res96", _residual_groups(96)),
    "best-res-channel": _best_with("best-res-channel", _residual_groups(None)),
    "best-k48": _best_with("best-k48", lambda: [GroupChannels(groups=48, roles=CHANNEL_ROLES, grouping="range")]),
    "migrate": recipes.Recipe("migrate", "gamma migration alone", prepare=lambda: [MigrateGamma()]),
    "os-global": dataclasses.replace(recipes.RECIPES["os"], name="os-global", finish=_global_clip),
    "os+peg-global": dataclasses.replace(recipes.RECIPES["os+peg"], name="os+peg-global", finish=_global_clip),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--recipes", required=True, help=f"comma-separated: {', '.join(VARIANTS)} (and suffixes)")
    parser.add_argument("--bits", nargs="+", default=["W8A8"])
    parser.add_argument("--json")
    args = parser.parse_args()
    recipes.RECIPES.update(VARIANTS)
    result = benchmarks.accuracy(args.model, args.bits, args.recipes.split(","), policy="full")
    benchmarks.print_table(result)
    if args.json:
        benchmarks.write_json(result, args.json)


if __name__ == "__main__":
    main()
