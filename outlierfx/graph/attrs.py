"""Reading and writing a GraphModule's tensors by their dotted ``get_attr`` target.

Passes never edit a tensor in place (the captured graph shares storage with the user's model);
they register a new tensor under a target instead.
"""

from __future__ import annotations

import torch


def fetch_attr(gm: torch.nn.Module, target: str) -> torch.Tensor:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[return-value]


def _owner(gm: torch.nn.Module, target: str) -> tuple[torch.nn.Module, str]:
    *path, name = target.split(".")
    owner = gm
    for part in path:
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
    return owner, name


def set_attr(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    owner, name = _owner(gm, target)
    if isinstance(value, torch.nn.Parameter):
        owner.register_parameter(name, value)
    else:
        owner.register_buffer(name, value)


def del_attr(gm: torch.nn.Module, target: str) -> None:
    owner, name = _owner(gm, target)
    if hasattr(owner, name):
        delattr(owner, name)


def unique_attr_name(gm: torch.nn.Module, base: str) -> str:
    name, i = base, 0
    while True:
        try:
            fetch_attr(gm, name)
        except AttributeError:
            return name
        i += 1
        name = f"{base}_{i}"
