"""Named recipes: the passes that prepare a graph before observers go in, and the policy.

- ``naive``: plain PTQ, per-tensor min-max activations, per-channel symmetric weights.
- ``mp16``: ``naive`` with the FFN input/output and residual sums at 16 bit (W8A{8,16}).
- ``os``: Outlier Suppression's gamma migration, then ``naive`` placement (token-wise clipping
  joins when its pass lands).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ..quantizers.policy import BitWidths, QuantPolicy, make_policy
from .base import GraphPass
from .migrate_gamma import MigrateGamma


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    prepare: Callable[[], list[GraphPass]]
    default_policy: str = "full"

    def policy(self, bits: BitWidths, policy: str | QuantPolicy | None) -> QuantPolicy:
        if isinstance(policy, QuantPolicy):
            return policy
        return make_policy(policy or self.default_policy, bits)


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("naive", "per-tensor min-max PTQ", lambda: []),
        Recipe("mp16", "naive with FFN input/output and residual sums at 16 bit", lambda: [], "mp16"),
        Recipe("os", "gamma migration (Outlier Suppression), then naive PTQ", lambda: [MigrateGamma()]),
    )
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; available: {', '.join(RECIPES)}")
    return RECIPES[name]
