"""A quantized model as a QDQ ONNX model: ``QuantizeLinear -> DequantizeLinear`` around int8 MatMuls.

What is exported is the ``reference`` backend's form of the model (:mod:`outlierfx.backends.reference`):
every activation quantizer a ``quantize -> dequantize`` pair with its static per-tensor grid,
every quantized Linear weight int8 codes behind a per-output-channel ``dequantize``, quantized
embedding tables int8 rows times their scales. torch.onnx's exporter (``dynamo=True``: it
re-exports the graph with ``torch.export`` and translates each aten op with ONNX Script's
library) maps the ``quantized_decomposed`` pairs to ``QuantizeLinear``/``DequantizeLinear``,
which ONNX Runtime fuses with the MatMul between them into an int8 GEMM
(``MatMulIntegerToFloat``). First-token (``+sink``) grids are in that form already: the first
rows (each text's first real tokens, gathered by the graph's first-token mask) quantized again
on their own grid and carried beside the main tensor (``GatherElements``, ``Where``;
:mod:`outlierfx.backends.first_rows`). outlierfx's online Hadamard op becomes two
small MatMuls (:mod:`.translations`). Int8 weights are stored ``[in, out]`` with one scale per
column, so each GEMM reads its dequantized initializer directly (:mod:`.weights`).
"""

from __future__ import annotations

import inspect
import os
import pathlib
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree

from ..backends.reference import Q_CHANNEL, Q_TENSOR
from ..errors import ExportError
from ..graph import meta
from ..quantizers.observers import FakeQuantize
from .translations import TRANSLATIONS
from .weights import fold_weight_transposes

_QUANTIZE_OPS = (Q_TENSOR, Q_CHANNEL)
_FULL_RANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127)}  # what QuantizeLinear saturates to
OPSET = 18  # QuantizeLinear/DequantizeLinear per axis (13+), LayerNormalization (17+)


def export_onnx(model: torch.nn.Module | str | os.PathLike, path: str | os.PathLike) -> pathlib.Path:
    """Write ``model`` as a QDQ ONNX model to the file ``path``; returns the path.

    ``model``: what :func:`outlierfx.quantize` or :func:`outlierfx.lower` returned (lowered to any
    backend, or fake-quant; a causal LM quantized with ``generation=False``), or a folder
    :func:`outlierfx.save` wrote. The ONNX model takes the inputs the model was quantized with, by
    name (``input_ids``, ``attention_mask``, ...), with dynamic batch and sequence sizes, and
    returns the outputs of its Hugging Face ``ModelOutput`` by name (``last_hidden_state``,
    ``logits``, ...). Raises :class:`~outlierfx.errors.ExportError` for what QDQ ONNX cannot
    express."""
    from ..generation import QuantizedCausalLM
    from ..passes.lower import lower_model
    from ..serialize import load, pre_lowering

    if isinstance(model, (str, os.PathLike)):
        model = load(model, backend="fake-quant")
    if isinstance(model, QuantizedCausalLM):
        raise ExportError("this causal LM was quantized for generation (a graph with a KV cache), which has no ONNX "
                          "form here; export its one-pass forward: outlierfx.quantize(model, calibration, "
                          "generation=False), then export_onnx that model")
    source, _, _ = pre_lowering(model)
    reference, _ = lower_model(source, "reference")
    check_exportable(reference)
    return graph_to_onnx(reference.eval(), path)


def check_exportable(gm: torch.fx.GraphModule) -> None:
    """Refuse a reference-form graph with quantizers QDQ ONNX has no form for: one left simulated
    (wider than 8 bits, or a first-token grid beside a per-channel or grouped main grid), or an
    activation grid narrower than its integer type (QuantizeLinear saturates to the whole
    int8/uint8 range, it takes no quant_min/quant_max)."""
    simulated = [(name, m) for name, m in gm.named_modules() if isinstance(m, FakeQuantize) and m.enabled]
    wide = [name for name, m in simulated if m.spec.bits > 8]
    if wide:
        raise ExportError(f"{_some(wide)} quantize activations to more than 8 bits (policy mp16); their grids stay "
                          f"simulated and ONNX has no int8 form for them: export a model with 8-bit activations")
    if simulated:
        raise ExportError(f"{_some([name for name, _ in simulated])} put the first tokens on a grid of their own "
                          f"beside per-channel (PEG) groups, which stays simulated in the int8 form: export a model "
                          f"quantized without '+sink' on its PEG recipe (e.g. recipe 'smooth-peg' instead of "
                          f"'accurate'), or the fast preset")
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _QUANTIZE_OPS:
            qmin, qmax, dtype = node.args[-3:]
            if _FULL_RANGE.get(dtype) != (qmin, qmax):
                raise ExportError(f"{meta.module_path(node) or node.name}: an activation grid of codes {qmin}..{qmax} "
                                  f"({dtype}); ONNX QuantizeLinear saturates to the whole int8/uint8 range and would "
                                  f"compute other values. Export a model with 8-bit activations (bits W8A8 or W4A8)")


def _some(names: list[str]) -> str:
    return f"{len(names)} quantizer(s) ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"


def graph_to_onnx(gm: torch.fx.GraphModule, path: str | os.PathLike) -> pathlib.Path:
    """Export a captured graph (float, as :func:`outlierfx.capture` returns it, or the reference
    int8 form) to the ONNX file ``path`` with dynamic batch and sequence sizes."""
    onnx = _onnx_packages()
    example = gm.meta.get(meta.GM_EXAMPLE_INPUTS)
    if example is None:
        raise ExportError("the graph carries no example inputs to export with; export the model outlierfx.quantize "
                          "or outlierfx.capture returned")
    args, kwargs = tuple(example[0]), dict(example[1])
    with torch.no_grad():
        outputs = gm(*args, **kwargs)
    dynamic = {name: pytree.tree_map(_batch_and_sequence, value)
               for name, value in inspect.signature(gm.forward).bind(*args, **kwargs).arguments.items()}
    try:
        program = torch.onnx.export(gm, args, kwargs=kwargs, dynamo=True, opset_version=OPSET,
                                    dynamic_shapes=dynamic, output_names=output_names(outputs),
                                    custom_translation_table=TRANSLATIONS, optimize=True, verbose=False)
    except Exception as exc:  # torch.onnx wraps what failed (an op without an ONNX form, a shape) in its own errors
        summary = str(exc).split("## Exception summary")[-1].strip().splitlines()
        raise ExportError(f"torch.onnx could not export the graph: {' '.join(summary[:4])[:600]}. An op without "
                          f"an ONNX form needs an entry in outlierfx.export.translations") from exc
    model = program.model_proto
    fold_weight_transposes(model)
    onnx.checker.check_model(model)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _batch_and_sequence(value: Any) -> dict[int, Any] | None:
    """The first two sizes of a tensor input stay symbolic where the graph allows (``Dim.AUTO``:
    a graph captured with static shapes exports with them)."""
    if not isinstance(value, torch.Tensor):
        return None
    return {axis: torch.export.Dim.AUTO for axis in range(min(value.dim(), 2))}


def output_names(outputs: Any) -> list[str]:
    """A name for each tensor of ``outputs`` in the order torch.onnx flattens them: a
    ``ModelOutput``'s or a dict's keys (``logits``), positions in tuples joined by ``_``."""
    names = []
    for path, leaf in pytree.tree_flatten_with_path(outputs)[0]:
        if isinstance(leaf, torch.Tensor):
            parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
            names.append("_".join(parts) or "output")
    return names


def _onnx_packages() -> Any:
    """``onnx`` and ``onnxscript`` (what torch.onnx's exporter needs), or an error naming the install."""
    try:
        import onnx
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ExportError(f"ONNX export needs the onnx and onnxscript packages ({exc.name} is missing): "
                          f"pip install 'outlierfx[onnx]'") from exc
    return onnx
