"""A fake-quant GraphModule as a JSON document plus tensors, and back, without pickle.

The document's schema (nodes, attributes, modules, calling convention) is described in
``docs/saved-format.md``; :func:`encode_graph` writes it and :func:`decode_graph` reads it.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import json
import math
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, is_concrete_int
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._dynamo.source import ConstantSource

from ..errors import OutlierFXError, SavedFormatError
from ..graph import meta
from ..graph.attrs import fetch_attr, set_attr, tensor_identity
from ..graph.probe import flatten_with_spec
from ..graph.roles import Role
from ..graph.shapes import propagate_values
from ..quantizers.observers import FakeQuantize
from ..quantizers.spec import Estimator, Granularity, QuantSpec
from ..quantizers.integer_codes import HeldCodes, integer_weight, quantized_weights
from .tensors import TensorWriter
from .vocabulary import name_of, target_of

_FQ_BUFFERS = ("scale", "zero_point", "sink_scale", "sink_zero_point")
_META_STRINGS = {"module_path": meta.MODULE_PATH, "created_by": meta.CREATED_BY}


# -- encoding -------------------------------------------------------------------------------------
def encode_graph(gm: torch.fx.GraphModule, writer: TensorWriter) -> dict[str, Any]:
    """The JSON document of a fake-quant ``gm``; its tensors go to ``writer``."""
    nodes = [_encode_node(node) for node in gm.graph.nodes]
    targets = list(dict.fromkeys(str(n.target) for n in gm.graph.nodes if n.op == "get_attr"))
    tensors = {target: fetch_attr(gm, target) for target in targets}
    # a tensor under several names (a tied lm_head and embedding) is one entry, int8 if any reader's is
    specs = {tensor_identity(tensors[t]): spec for t, spec in quantized_weights(gm).items()}
    stored: dict[tuple, dict[str, str]] = {}
    attributes = {}
    for target, tensor in tensors.items():
        identity = tensor_identity(tensor)
        if identity not in stored:
            stored[identity] = _store_tensor(target, tensor, specs.get(identity), writer)
        attributes[target] = {"parameter": isinstance(tensor, torch.nn.Parameter),
                              "requires_grad": bool(tensor.requires_grad), **stored[identity]}
    modules = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in modules:
            modules[node.target] = _encode_module(str(node.target), gm.get_submodule(node.target), writer)
    info = getattr(gm.graph._codegen, "pytree_info", None)
    convention = None if info is None else {
        "inputs": list(info.orig_args), "in_spec": pytree.treespec_dumps(info.in_spec),
        "out_spec": pytree.treespec_dumps(info.out_spec) if info.out_spec is not None else None}
    return {"nodes": nodes, "attributes": attributes, "modules": modules, "calling_convention": convention}


def encode_value(value: Any, writer: TensorWriter | None = None, name: str = "") -> Any:
    """A node argument (or, with ``writer``, an example input) as JSON."""
    if isinstance(value, torch.fx.Node):
        return {"node": value.name}
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, tuple):
        return {"tuple": [encode_value(v, writer, f"{name}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode_value(v, writer, f"{name}.{i}") for i, v in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: encode_value(v, writer, f"{name}.{k}") for k, v in value.items()}}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, (torch.layout, torch.memory_format)):
        return {type(value).__name__: str(value).removeprefix("torch.")}
    if isinstance(value, torch.Tensor) and writer is not None:
        return {"tensor": writer.add(name, value)}
    raise OutlierFXError(f"cannot save a graph argument of type {type(value).__name__} ({value!r}); "
                         f"outlierfx.save writes the graphs outlierfx.quantize returns")


def _encode_node(node: torch.fx.Node) -> dict[str, Any]:
    target: Any = node.target
    if node.op == "call_function":
        target = name_of(node.target)
        if target is None:
            raise OutlierFXError(f"node {node.name} calls {node.target}, which a saved graph may not call (only "
                                 f"aten ops and outlierfx.serialize.vocabulary.OPS); register an op of "
                                 f"outlierfx's own there (one line)")
    elif node.op not in ("placeholder", "get_attr", "call_module", "output"):
        raise OutlierFXError(f"node {node.name}: cannot save a {node.op!r} node")
    saved_meta: dict[str, Any] = {k: node.meta[key] for k, key in _META_STRINGS.items() if key in node.meta}
    if meta.WEIGHT_QUANT in node.meta:
        saved_meta["weight_quant"] = encode_spec(node.meta[meta.WEIGHT_QUANT])
    val = _encode_val(node.meta.get("val"))
    if val is not None:
        saved_meta["val"] = val
    return {"name": node.name, "op": node.op, "target": target, "args": encode_value(list(node.args)),
            "kwargs": {k: encode_value(v) for k, v in node.kwargs.items()}, "meta": saved_meta}


def _encode_val(val: Any) -> Any:
    if isinstance(val, torch.Tensor):
        return {"dtype": str(val.dtype).removeprefix("torch."), "shape": [_size(s) for s in val.shape]}
    if isinstance(val, torch.SymInt):
        return {"symint": _size(val)}
    if isinstance(val, (tuple, list)) and val and all(isinstance(v, torch.Tensor) for v in val):
        return {"tuple": [_encode_val(v) for v in val]}
    return None


def _size(size: int | torch.SymInt) -> int | str:
    """A size as saved: its symbol's name, or a number where it is one. Sizes that export or
    lowering specialized stay SymInts whose expression is a number (a lowered KV-cache graph's
    all are); saved by name they would load as a symbol that every equal size shares (the
    prompt's length and the cache's, say), which the graph does not say and which
    torch.compile acts on (it merges size nodes of equal symbols)."""
    return int(size) if is_concrete_int(size) else str(size.node.expr)


def _store_tensor(target: str, tensor: torch.Tensor, spec: QuantSpec | None, writer: TensorWriter) -> dict[str, str]:
    integer = integer_weight(tensor, spec) if spec is not None else None
    if integer is None:
        return {"tensor": writer.add(target, tensor)}
    return {"int8": writer.add(f"{target}.int8", integer.codes), "scale": writer.add(f"{target}.scale", integer.scale)}


def _encode_module(target: str, module: torch.nn.Module, writer: TensorWriter) -> dict[str, Any]:
    if type(module) is not FakeQuantize:
        raise OutlierFXError(f"module {target} is a {type(module).__name__}; a saved graph holds fake quantizers "
                             f"only (save the model outlierfx.quantize returns, after calibration)")
    return {"kind": "fake_quantize", "spec": encode_spec(module.spec), "name": module.name,
            "roles": sorted(r.value for r in module.roles), "enabled": bool(module.enabled),
            "buffers": {b: writer.add(f"{target}.{b}", getattr(module, b)) for b in _FQ_BUFFERS}}


def encode_spec(spec: QuantSpec) -> dict[str, Any]:
    out = {}
    for field in dataclasses.fields(spec):
        value = getattr(spec, field.name)
        out[field.name] = value.value if isinstance(value, enum.Enum) else list(value) if isinstance(value, tuple) \
            else value
    return out


# -- decoding -------------------------------------------------------------------------------------
def decode_spec(fields: dict[str, Any]) -> QuantSpec:
    known = {f.name for f in dataclasses.fields(QuantSpec)}
    unknown = set(fields) - known
    if unknown:
        raise SavedFormatError(f"quantization spec fields {sorted(unknown)} are unknown to this outlierfx; "
                               f"upgrade outlierfx to read this model")
    values = dict(fields)
    values["granularity"] = Granularity(values["granularity"])
    values["estimator"] = Estimator(values["estimator"])
    if values.get("permutation") is not None:
        values["permutation"] = tuple(values["permutation"])
    return QuantSpec(**values)


def decode_value(value: Any, nodes: dict[str, torch.fx.Node], tensors: dict[str, torch.Tensor] | None = None) -> Any:
    if isinstance(value, list):
        return [decode_value(v, nodes, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) != 1:
        raise SavedFormatError(f"unreadable argument {value!r}")
    (tag, payload), = value.items()
    if tag == "node":
        return nodes[payload]
    if tag == "tuple":
        return tuple(decode_value(v, nodes, tensors) for v in payload)
    if tag == "dict":
        return {k: decode_value(v, nodes, tensors) for k, v in payload.items()}
    if tag == "float":
        return float(payload)
    if tag == "tensor" and tensors is not None:
        return tensors[payload]
    if tag in ("dtype", "layout", "memory_format"):
        found = getattr(torch, payload, None)
        if isinstance(found, (torch.dtype, torch.layout, torch.memory_format)):
            return found
    if tag == "device":
        return torch.device(payload)
    raise SavedFormatError(f"unreadable argument {value!r}")


def decode_graph(doc: dict[str, Any], tensors: dict[str, torch.Tensor],
                 example: tuple[tuple, dict]) -> torch.fx.GraphModule:
    """The fake-quant GraphModule of :func:`encode_graph`'s document, its values propagated
    with the saved symbolic sizes (``example``: the saved example inputs, for size hints)."""
    root = torch.nn.Module()
    rebuilt: dict[tuple[str, str], torch.Tensor] = {}  # one float weight per int8 entry (tied names stay tied)
    for target, entry in doc["attributes"].items():
        set_attr(root, target, _decode_attribute(entry, tensors, rebuilt))
    for target, entry in doc["modules"].items():
        owner = root
        *path, name = target.split(".")
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        owner.add_module(name, _decode_module(target, entry, tensors))
    graph = torch.fx.Graph()
    nodes: dict[str, torch.fx.Node] = {}
    for entry in doc["nodes"]:
        node = _decode_node(graph, entry, nodes)
        if node.name != entry["name"]:
            raise SavedFormatError(f"node name {entry['name']!r} appears twice in the saved graph")
        nodes[node.name] = node
    convention = doc["calling_convention"]
    if convention is not None:
        _import_output_types(convention["out_spec"])
        in_spec = pytree.treespec_loads(convention["in_spec"])
        out_spec = pytree.treespec_loads(convention["out_spec"]) if convention["out_spec"] else None
        graph._codegen = torch.fx.graph._PyTreeCodeGen(
            torch.fx.graph._PyTreeInfo(convention["inputs"], in_spec, out_spec))
    gm = torch.fx.GraphModule(root, graph)
    graph.lint()
    _propagate(gm, doc["nodes"], flatten_with_spec(
        gm.graph._codegen.pytree_info.in_spec if convention is not None else None, *example))
    return gm


def _decode_node(graph: torch.fx.Graph, entry: dict[str, Any], nodes: dict[str, torch.fx.Node]) -> torch.fx.Node:
    op, target = entry["op"], entry["target"]
    if op == "call_function":
        resolved = target_of(target)
        if resolved is None:
            raise SavedFormatError(f"the saved graph calls {target!r}, an op this outlierfx does not know or does "
                                   f"not allow (only aten ops and its own); upgrade outlierfx, or save the model "
                                   f"again with this version")
        target = resolved
    elif op not in ("placeholder", "get_attr", "call_module", "output"):
        raise SavedFormatError(f"node {entry['name']}: unknown node kind {op!r}")
    args = tuple(decode_value(entry["args"], nodes))
    kwargs = {k: decode_value(v, nodes) for k, v in entry["kwargs"].items()}
    node = graph.create_node(op, target, args, kwargs, name=entry["name"])
    saved = entry["meta"]
    for key, meta_key in _META_STRINGS.items():
        if key in saved:
            node.meta[meta_key] = saved[key]
    if "weight_quant" in saved:
        node.meta[meta.WEIGHT_QUANT] = decode_spec(saved["weight_quant"])
    return node


def _decode_attribute(entry: dict[str, Any], tensors: dict[str, torch.Tensor],
                      rebuilt: dict[tuple[str, str], torch.Tensor]) -> torch.Tensor:
    if "tensor" in entry:
        value = tensors[entry["tensor"]]
        if value._is_view():  # safetensors may hand out views of one buffer; graphs may detach_ in place
            value = value.clone()
    else:
        key = (entry["int8"], entry["scale"])
        if key not in rebuilt:
            rebuilt[key] = HeldCodes(tensors[key[0]], tensors[key[1]]).weight()
        value = rebuilt[key]
    if entry["parameter"]:
        return torch.nn.Parameter(value, requires_grad=entry["requires_grad"])
    return value


def _decode_module(target: str, entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> FakeQuantize:
    if entry.get("kind") != "fake_quantize":
        raise SavedFormatError(f"module {target} is a {entry.get('kind')!r}, unknown to this outlierfx; upgrade it")
    buffers = {name: tensors[key] for name, key in entry["buffers"].items()}
    module = FakeQuantize(decode_spec(entry["spec"]), buffers["scale"], buffers["zero_point"], entry["name"],
                          frozenset(Role(r) for r in entry["roles"]))
    module.sink_scale, module.sink_zero_point = buffers["sink_scale"], buffers["sink_zero_point"]
    module.enabled = entry["enabled"]
    return module


def _import_output_types(out_spec: str | None) -> None:
    """Hugging Face output classes register with torch's pytree when their module is imported:
    import the ``transformers`` modules the output spec names (and no other module)."""
    stack = [json.loads(out_spec)[1]] if out_spec else []
    while stack:
        spec = stack.pop()
        module = (spec.get("type") or "").rpartition(".")[0]
        if module == "transformers" or module.startswith("transformers."):
            importlib.import_module(module)
        stack.extend(spec.get("children_spec", []))


def _propagate(gm: torch.fx.GraphModule, saved_nodes: list[dict[str, Any]], flat_inputs: list[Any]) -> None:
    """``meta["val"]`` of every node, from placeholders with the saved symbolic sizes (one symbol
    per saved name, the example inputs' sizes as hints); then check the saved dtypes."""
    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env, allow_non_fake_inputs=True)
    symbols: dict[str, torch.SymInt] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    saved = {entry["name"]: entry["meta"].get("val") for entry in saved_nodes}
    for node, example in zip(placeholders, flat_inputs):
        val = saved.get(node.name)
        if not isinstance(example, torch.Tensor) or val is None or "shape" not in val:
            continue
        sizes = []
        for size, hint in zip(val["shape"], example.shape):
            if isinstance(size, str) and size.isdigit():  # a number saved as a name (before _size wrote numbers)
                size = int(size)
            if isinstance(size, str):
                if size not in symbols:
                    symbol = env.create_symbol(int(hint), ConstantSource(size), dynamic_dim=DimDynamic.DYNAMIC)
                    symbols[size] = env.create_symintnode(symbol, hint=int(hint), source=ConstantSource(size))
                size = symbols[size]
            sizes.append(size)
        with mode:
            node.meta["val"] = torch.empty(sizes, dtype=example.dtype)
    propagate_values(gm, full=True)
    for node in gm.graph.nodes:
        want, got = saved.get(node.name), node.meta.get("val")
        if want and "dtype" in want and isinstance(got, torch.Tensor) and str(got.dtype) != f"torch.{want['dtype']}":
            raise SavedFormatError(f"node {node.name} computes {got.dtype} here but was saved as {want['dtype']}: the "
                                   f"graph does not load the same under this torch; use the torch it was saved with")
