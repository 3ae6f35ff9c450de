"""GroupChannels: per-embedding-group (PEG) quantization, Bondarenko et al. 2021.

For the residual-stream tensors that carry structured outliers (by default the FFN input, the
FFN output and the residual sums), the hidden dimension is split into K groups, each with its
own scale and zero point. Channels are sorted by their calibrated range (max - min), aggregated
over *all* calibration batches, before being cut into balanced contiguous groups, so the few
outlier channels share a group. The permutation is an index vector, never a d x d matrix;
K = 1 is exactly per-tensor and K = d exactly per-channel.

The pass runs after InsertObservers and before calibration: it gives the chosen observers a
per-group spec (they then collect per-channel statistics). The permutation itself is known
after calibration; ConvertToFakeQuant records it in its plan.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from ..errors import PassError
from ..graph.ops import tensor_val
from ..graph.roles import Role
from ..quantizers.observers import Observer
from ..quantizers.spec import Estimator, Granularity
from .base import GraphPass

PEG_ROLES = frozenset({Role.FFN_INPUT, Role.FFN_OUTPUT, Role.RESIDUAL_SUM})
# every activation whose last axis is a channel axis (all but the attention matrices and contexts)
CHANNEL_ROLES = PEG_ROLES | {Role.LINEAR_INPUT, Role.LINEAR_OUTPUT, Role.NORM_OUTPUT, Role.EMBEDDING_SUM}


@dataclasses.dataclass(frozen=True)
class GroupedTensor:
    observer: str
    tensor: str
    roles: frozenset[Role]
    groups: int


@dataclasses.dataclass(frozen=True)
class GroupChannelsPlan:
    groups: int | None  # None: one group per channel
    sort_channels: bool
    tensors: tuple[GroupedTensor, ...]
    grouping: str = "equal"

    def summary(self) -> str:
        order = "sorted by calibrated range" if self.sort_channels else "in natural order"
        k = "one group per channel" if self.groups is None else f"K={self.groups} channel groups"
        if self.grouping == "range" and self.groups is not None:
            k += " sized by range"
        return f"PEG: {len(self.tensors)} tensors split into {k} ({order})"


class GroupChannels(GraphPass[GroupChannelsPlan]):
    output_rel_tol = 0.0  # only observer specs change

    def __init__(self, groups: int | None = 6, roles: frozenset[Role] = PEG_ROLES, sort_channels: bool = True,
                 grouping: str = "equal", exclude_roles: frozenset[Role] = frozenset()) -> None:
        """Groups the per-tensor observers with one of ``roles`` and none of ``exclude_roles``
        (e.g. Linear inputs that are no norm output: ``roles={LINEAR_INPUT}``,
        ``exclude_roles={NORM_OUTPUT}``). ``groups=None`` gives every channel its own range (K =
        the tensor's channel count); ``grouping="range"`` sizes the sorted groups to minimise the
        summed squared step (outlier channels alone, ordinary ones together) instead of the
        paper's equal sizes."""
        if groups is not None and groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        self.groups = groups
        self.roles = frozenset(roles)
        self.exclude_roles = frozenset(exclude_roles)
        self.sort_channels = sort_channels
        self.grouping = grouping
        if grouping not in ("equal", "range") or (grouping == "range" and not sort_channels):
            raise ValueError(f"grouping must be 'equal' or 'range' (with sorted channels), got {grouping!r}")

    def analyze(self, gm: torch.fx.GraphModule) -> GroupChannelsPlan:
        chosen = []
        for name, module in gm.named_children():
            if not isinstance(module, Observer) or not (module.roles & self.roles) or module.roles & self.exclude_roles:
                continue
            if module.calibrated:
                raise PassError(f"observer {name} is already calibrated; GroupChannels must run before calibrate()")
            if module.spec.granularity is not Granularity.PER_TENSOR:
                continue
            groups = self.groups
            if groups is None:
                node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == name)
                value = tensor_val(node)
                if value is None or value.dim() == 0:
                    raise PassError(f"{name}: per-channel groups need the tensor's shape (run shape propagation)")
                groups = int(value.shape[-1])
            chosen.append(GroupedTensor(name, module.name, module.roles, groups))
        return GroupChannelsPlan(self.groups, self.sort_channels, tuple(chosen), self.grouping)

    def apply(self, gm: torch.fx.GraphModule, plan: GroupChannelsPlan) -> bool:
        for item in plan.tensors:
            old: Observer = getattr(gm, item.observer)
            spec = old.spec.with_(granularity=Granularity.PER_GROUP, axis=-1, groups=item.groups,
                                  sort_channels=self.sort_channels, grouping=self.grouping,
                                  estimator=Estimator.MINMAX)
            setattr(gm, item.observer, Observer(spec, old.name, old.roles))  # a new module: the input keeps its own
        return bool(plan.tensors)
