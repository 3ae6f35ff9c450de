"""Reading and writing a GraphModule's tensors by their dotted ``get_attr`` target.

Passes never edit a tensor in place (the captured graph shares storage with the user's model);
they register a new tensor under a target instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx


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


def is_shared_attr(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether the tensor of ``get_attr`` node ``node`` is read by more than one op (tied weights)."""
    return len(node.users) > 1 or any(
        n is not node and n.op == "get_attr" and n.target == node.target for n in gm.graph.nodes
    )


def replace_input_tensor(
    gm: torch.fx.GraphModule, consumer: torch.fx.Node, old: torch.fx.Node, value: torch.Tensor, suffix: str
) -> torch.fx.Node:
    """Make ``consumer`` read ``value`` where it read the ``get_attr`` node ``old`` (a parameter
    where ``old``'s tensor is one), under the target :func:`replace_input` chooses."""
    wrapped = torch.nn.Parameter(value, requires_grad=False) \
        if isinstance(fetch_attr(gm, str(old.target)), torch.nn.Parameter) else value
    return replace_input(gm, consumer, old, suffix, lambda target: set_attr(gm, target, wrapped))


def replace_input(gm: torch.fx.GraphModule, consumer: torch.fx.Node, old: torch.fx.Node, suffix: str,
                  register: Callable[[str], None]) -> torch.fx.Node:
    """Make ``consumer`` read a new tensor where it read the ``get_attr`` node ``old``;
    ``register(target)`` registers that tensor under the target chosen here.

    If ``old`` feeds only ``consumer`` and its target is not read elsewhere, the tensor is
    re-registered under the same name (reports keep the user's parameter names). Otherwise
    (a weight tied to another op, such as an lm_head sharing the embedding) a new attribute
    ``<target><suffix>`` is created so the other readers keep the original.
    """
    target = str(old.target)
    if not is_shared_attr(gm, old):
        register(target)
        return old
    new_target = unique_attr_name(gm, target + suffix)
    register(new_target)
    with gm.graph.inserting_before(consumer):
        node = gm.graph.get_attr(new_target)
    node.meta.update({k: v for k, v in old.meta.items() if k != "val"})
    consumer.replace_input_with(old, node)
    return node


def tensor_identity(tensor: torch.Tensor) -> tuple:
    """Equal for two names of the same tensor (same memory, offset, shape, strides and dtype)."""
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()),
            tensor.dtype)
