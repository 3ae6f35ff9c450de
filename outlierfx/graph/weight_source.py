"""Graphs captured without their weights, and loading those weights only where they are needed.

:func:`capture_without_weights` captures a Hugging Face folder's model without reading its
weights: the model is built on the meta device (``outlierfx.models.build_without_weights``),
its checkpoint tensors become fake CPU tensors for ``torch.export`` (meta ones would not do:
export records the device of the tensors it traces, so the graph would create its position ids
and masks on the meta device), and the captured graph holds them on the meta device: shapes and
dtypes, no storage. ``gm.meta[GM_WEIGHT_SOURCE]`` is a :class:`WeightSource` naming, for each
of them, the safetensors file and key it loads from. :func:`materialize` loads the named
tensors (reading only their keys) and :func:`release` puts them back on the meta device, so a
runner can hold one block's weights at a time (:func:`materialized` for a ``with`` block).

A weight rewritten in memory can no longer be loaded from the checkpoint: the source always
names its latest version. The rewrites before calibration (MigrateGamma, the rotations) record
how the new tensor is computed from its inputs' entries (:func:`rewrite_tensor`, a
:class:`~outlierfx.graph.derived_tensors.DerivedTensor`), which :func:`materialize` computes
when a block loads it, with the function the full-memory path applies to the loaded weight;
they read small tensors (norm gains) with :func:`value_of`. ConvertToFakeQuant's on-grid weights
are held as int8 codes and per-row scales
(:class:`~outlierfx.quantizers.integer_codes.HeldCodes`, :func:`hold`), a quarter of the float
size, from which :func:`materialize` rebuilds the float weight bit for bit, and from which
``Lower`` builds its int8 kernels without the float weight.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import pathlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from ..errors import CaptureError, DataError
from ..quantizers.integer_codes import HeldCodes
from . import meta
from .attrs import fetch_attr, replace_input, set_attr
from .capture import capture
from .derived_tensors import DerivedTensor, evaluate


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a checkpoint."""

    file: pathlib.Path
    key: str


Entry = StoredTensor | HeldCodes | DerivedTensor


@dataclasses.dataclass(frozen=True)
class WeightSource:
    """Graph attribute target -> where its tensor comes from: the checkpoint (a
    :class:`StoredTensor`; tied weights, an LM head sharing the embedding table, load from the
    one key the checkpoint stores for both), codes held in memory (:class:`HeldCodes`), or a
    computation on other entries (:class:`DerivedTensor`, a rewritten weight)."""

    tensors: Mapping[str, Entry]

    def with_entries(self, entries: Mapping[str, Entry]) -> WeightSource:
        """This source with the targets of ``entries`` loading from those instead."""
        return WeightSource({**self.tensors, **entries})

    @classmethod
    def from_checkpoint(cls, folder: str | os.PathLike, aliases: Mapping[str, Iterable[str]]) -> WeightSource:
        """``aliases``: each graph target with every name the model has for its tensor (a tied
        weight has several, and the checkpoint stores one of them)."""
        from ..models import checkpoint_keys

        stored = checkpoint_keys(pathlib.Path(folder))
        if not stored:
            raise DataError(f"{folder} has no safetensors weights, which a capture without weights loads tensor by "
                            f"tensor; save the model with save_pretrained (safetensors is its default)")
        tensors = {}
        for target, names in aliases.items():
            names = list(names)
            key = next((name for name in names if name in stored), None)
            if key is None:
                raise DataError(f"the checkpoint in {folder} has no tensor {' or '.join(map(repr, names))}, which the "
                                f"model reads; the weights do not belong to this config (save the model again with "
                                f"save_pretrained)")
            tensors[target] = StoredTensor(stored[key], key)
        return cls(tensors)


def capture_without_weights(folder: str | os.PathLike, example_inputs: Any, *, dynamic: bool = True,
                            wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> torch.fx.GraphModule:
    """Capture the model of a Hugging Face folder without reading its weights (see the module
    docstring), or ``wrap(model)`` (e.g. :class:`~outlierfx.graph.kv_cache.CachedDecoder`, the
    generating graph with its KV cache) with ``example_inputs`` in the wrapper's form. The
    capture check, which runs the model, is skipped: with the weights materialized, the graph
    computes what the loaded model computes."""
    from ..models import build_without_weights

    model = build_without_weights(folder)
    aliases = _aliases(model)
    _fake_stored_tensors(model)
    root = model if wrap is None else wrap(model)
    inner = next(path for path, module in root.named_modules() if module is model)  # the wrapper's name for it
    gm = capture(root, example_inputs, dynamic=dynamic, check=False)
    graph_aliases = {}
    for target, tensor in _graph_tensors(gm).items():
        name = target.removeprefix(f"{inner}.") if inner else target
        if name in aliases:
            graph_aliases[target] = aliases[name]
            set_attr(gm, target, _on_meta(tensor))
        elif _is_fake(tensor):  # canonicalization computed it from fake weights (Gemma's 1 + gain)
            raise CaptureError(f"the graph of {type(model).__name__} holds {target!r}, computed at capture from "
                               f"its weights, which a capture without weights cannot compute; capture the "
                               f"model with its weights")
    _share_tied(gm, graph_aliases)
    gm.meta[meta.GM_WEIGHT_SOURCE] = WeightSource.from_checkpoint(folder, graph_aliases)
    return gm


def _aliases(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Each name of a tensor the checkpoint stores (parameters, persistent buffers) -> every
    name the model has for that tensor."""
    names: dict[int, list[str]] = collections.defaultdict(list)
    for name, tensor in model.named_parameters(remove_duplicate=False):
        names[id(tensor)].append(name)
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, tensor in module.named_buffers(recurse=False):
            if tensor is not None and name not in module._non_persistent_buffers_set:
                names[id(tensor)].append(f"{module_name}.{name}" if module_name else name)
    return {name: tuple(group) for group in names.values() for name in group}


def _fake_stored_tensors(model: torch.nn.Module) -> None:
    """Replace the model's meta tensors by fake CPU tensors of the same shape, keeping ties."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is None or tensor.device.type != "meta":
                    continue
                if id(tensor) not in fakes:
                    with mode:
                        fake = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="cpu")
                    fakes[id(tensor)] = torch.nn.Parameter(fake, requires_grad=False) \
                        if isinstance(tensor, torch.nn.Parameter) else fake
                table[name] = fakes[id(tensor)]


def _graph_tensors(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    return dict([*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)])


def _is_fake(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, FakeTensor) or isinstance(getattr(tensor, "data", None), FakeTensor)


def _on_meta(tensor: torch.Tensor) -> torch.Tensor:
    """A storage-free stand-in for ``tensor`` (a Parameter where it was one)."""
    empty = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="meta")
    return torch.nn.Parameter(empty, requires_grad=False) if isinstance(tensor, torch.nn.Parameter) else empty


def _share_tied(gm: torch.fx.GraphModule, aliases: Mapping[str, tuple[str, ...]]) -> None:
    """Graph targets that name one model tensor hold one stand-in (as they held one tensor)."""
    first: dict[tuple[str, ...], str] = {}
    for target, group in aliases.items():
        if group in first:
            set_attr(gm, target, fetch_attr(gm, first[group]))
        else:
            first[group] = target


def _source(gm: torch.fx.GraphModule) -> WeightSource:
    source = gm.meta.get(meta.GM_WEIGHT_SOURCE)
    if source is None:
        raise ValueError("this graph was captured with its weights; only a graph from capture_without_weights "
                         "materializes and releases them")
    return source


def _checked_targets(source: WeightSource, names: Iterable[str]) -> list[str]:
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in source.tensors]
    if unknown:
        raise ValueError(f"{unknown[:4]} are not tensors this graph loads from its checkpoint")
    return names


def materialize(gm: torch.fx.GraphModule, names: Iterable[str]) -> None:
    """Load the graph tensors ``names`` (attribute targets) from the checkpoint, reading only
    their keys, in the dtype the graph holds them in, rebuild them from their held codes, or
    compute them from their inputs (:class:`DerivedTensor`). Targets sharing an entry share one
    tensor."""
    source = _source(gm)
    for targets, value in _loaded(gm, source, _checked_targets(source, names)):
        _set_all(gm, targets, value)


def _loaded(gm: torch.fx.GraphModule, source: WeightSource, targets: Iterable[str]
            ) -> list[tuple[list[str], torch.Tensor]]:
    """Each group of ``targets`` sharing an entry, with the entry's value as the graph holds it
    (a derived entry's intermediates are dropped once computed: :func:`evaluate`)."""
    from safetensors import safe_open

    groups: dict[Entry, list[str]] = collections.defaultdict(list)
    for target in targets:
        groups[source.tensors[target]].append(target)

    def load(entry: StoredTensor | HeldCodes) -> torch.Tensor:
        if isinstance(entry, HeldCodes):
            return entry.weight()
        # a file opened per tensor: the tensor maps the file, and its pages leave memory with it
        # (an input of a derived tensor as soon as that is computed), not when the last tensor
        # read from an open file goes
        with safe_open(str(entry.file), framework="pt", device="cpu") as f:
            return f.get_tensor(entry.key)

    values = evaluate(groups, load)
    loaded = []
    for entry, group in groups.items():
        value, like = values.pop(entry), fetch_attr(gm, group[0])
        if isinstance(entry, StoredTensor) and tuple(value.shape) != tuple(like.shape):
            raise DataError(f"{entry.file} stores {entry.key!r} with shape {tuple(value.shape)}, but the graph reads "
                            f"it as {tuple(like.shape)}; the weights do not belong to this config")
        loaded.append((group, value.to(like.dtype)))
    return loaded


def value_of(gm: torch.fx.GraphModule, target: str) -> torch.Tensor:
    """The value of the graph tensor ``target`` on either kind of graph: the tensor itself
    (detached) on a graph holding it, else its entry loaded into a temporary tensor that the
    graph does not register (for a pass's analysis of small tensors: norm gains)."""
    source = gm.meta.get(meta.GM_WEIGHT_SOURCE)
    if source is None or target not in source.tensors:
        return fetch_attr(gm, target).detach()
    return _loaded(gm, source, [target])[0][1]


def _set_all(gm: torch.fx.GraphModule, targets: list[str], value: torch.Tensor) -> None:
    """Register ``value`` under every name of ``targets``, as the stand-ins were registered."""
    if isinstance(fetch_attr(gm, targets[0]), torch.nn.Parameter):
        value = torch.nn.Parameter(value, requires_grad=False)
    for target in targets:
        set_attr(gm, target, value)


def release(gm: torch.fx.GraphModule, names: Iterable[str]) -> None:
    """Put the graph tensors ``names`` back on the meta device, letting their storage go. A
    target already there keeps its stand-in (and the ties it shares)."""
    source = _source(gm)
    stand_ins: dict[Entry, torch.Tensor] = {}
    for target in _checked_targets(source, names):
        if fetch_attr(gm, target).device.type == "meta":
            continue
        stored = source.tensors[target]
        if stored not in stand_ins:
            stand_ins[stored] = _on_meta(fetch_attr(gm, target))
        set_attr(gm, target, stand_ins[stored])


@contextlib.contextmanager
def materialized(gm: torch.fx.GraphModule, names: Iterable[str]) -> Iterator[None]:
    """The tensors ``names`` loaded (:func:`materialize`) for the ``with`` block, released after
    it (:func:`release`), also when it raises."""
    names = list(names)
    materialize(gm, names)
    try:
        yield
    finally:
        release(gm, names)


def hold(gm: torch.fx.GraphModule, held: Mapping[str, HeldCodes]) -> None:
    """From now on the targets ``held`` load from their codes (rewritten weights the checkpoint
    no longer has; targets new to the graph too), and their float tensors are released. Sets a
    new source: a pass works on a copy of the graph, whose input keeps the source it had."""
    gm.meta[meta.GM_WEIGHT_SOURCE] = _source(gm).with_entries(held)
    release(gm, held)


def rewrite_tensor(gm: torch.fx.GraphModule, target: str, compute: Callable[[torch.Tensor], torch.Tensor],
                   description: str, new_target: str | None = None,
                   in_place: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Register ``compute(tensor at target)`` under ``new_target`` (default: ``target``; a
    parameter stays a frozen parameter). On a graph that loads ``target`` from its weight source
    nothing is computed now: the source (a new one, as :func:`hold` sets) gets a
    :class:`DerivedTensor` that :func:`materialize` computes with the same ``compute`` on the same
    input, so both kinds of graph hold the same tensor bit for bit, and the graph a meta
    stand-in. ``compute`` must keep the shape and dtype (checked when it runs). ``in_place``, if
    given, computes the same values into its argument (used where the loaded input is nobody
    else's: :func:`~outlierfx.graph.derived_tensors.evaluate`); the graph's own tensor is never
    overwritten."""
    new_target = new_target or target
    old = fetch_attr(gm, target)
    source = gm.meta.get(meta.GM_WEIGHT_SOURCE)
    if source is None or target not in source.tensors:
        value = compute(old.detach())
        set_attr(gm, new_target, torch.nn.Parameter(value, requires_grad=False)
                 if isinstance(old, torch.nn.Parameter) else value)
        return
    dtype = old.dtype

    def from_loaded(value: torch.Tensor) -> torch.Tensor:
        return compute(value.to(dtype))  # a checkpoint tensor loads in its stored dtype, the graph holds `dtype`

    def into_loaded(value: torch.Tensor) -> torch.Tensor:
        return in_place(value.to(dtype))  # type: ignore[misc]

    derived = DerivedTensor((source.tensors[target],), from_loaded, tuple(old.shape), dtype, description,
                            None if in_place is None else into_loaded)
    gm.meta[meta.GM_WEIGHT_SOURCE] = source.with_entries({new_target: derived})
    set_attr(gm, new_target, _on_meta(old))


def rewrite_input_tensor(gm: torch.fx.GraphModule, consumer: torch.fx.Node, old: torch.fx.Node,
                         compute: Callable[[torch.Tensor], torch.Tensor], description: str,
                         suffix: str, in_place: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.fx.Node:
    """Make ``consumer`` read ``compute(tensor of the get_attr node old)``, under ``old``'s target
    or, where another op reads that tensor too, a new one (``<target><suffix>``:
    :func:`~outlierfx.graph.attrs.replace_input`), by :func:`rewrite_tensor` (``in_place``: the
    same computation into its argument); returns the get_attr node ``consumer`` now reads."""
    return replace_input(gm, consumer, old, suffix, lambda new_target: rewrite_tensor(
        gm, str(old.target), compute, description, new_target, in_place))


def held_codes(gm: torch.fx.GraphModule, target: str) -> HeldCodes | None:
    """The int8 codes the graph tensor ``target`` loads from (:func:`hold`); None for a graph
    captured with its weights, or a tensor that loads from the checkpoint."""
    source = gm.meta.get(meta.GM_WEIGHT_SOURCE)
    entry = None if source is None else source.tensors.get(target)
    return entry if isinstance(entry, HeldCodes) else None


def with_checkpoint_tensors(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` holding for real every tensor it does not hold as codes: those no pass
    quantized (norm gains, biases, tables kept float; loaded from the checkpoint, or computed
    where a pass rewrote them), which a lowered model holds as they are. Its held codes stay
    codes (their targets meta stand-ins): ``Lower`` builds its int8 kernels from them
    (:func:`held_codes`) and never needs their float weights."""
    from .copy import copy_graph_module

    floats = [target for target, entry in _source(gm).tensors.items() if not isinstance(entry, HeldCodes)]
    work = copy_graph_module(gm)
    materialize(work, floats)
    return work
