"""Saving and loading quantized models.

A lowered model is a ``torch.fx.GraphModule`` whose int8 Linear modules hold plain int8 weights
(packed again for the CPU's engine on first use), so the whole module is saved with
``torch.save`` (as a :class:`SavedModel`) and reloaded in a new process with identical outputs. Loading unpickles code:
only load files you (or outlierfx) wrote.
"""

from __future__ import annotations

import json
import math
import pathlib
import warnings
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from .errors import DataError, OutlierFXError
from .graph.copy import copy_graph_module
from .graph.probe import flatten_with_spec
from .backends import runtime

MODEL_FILE = "model.pt"
INFO_FILE = "outlierfx.json"
FORMAT_VERSION = 1


class KernelLeafTracer(torch.fx.Tracer):
    """What torch re-traces a saved graph's code with on load: outlierfx's run-time kernel
    functions (first-token grids, the attention-mask check) are called, not traced into; their
    shape and value branches cannot take symbolic inputs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(autowrap_modules=(math, runtime))


class SavedModel(torch.nn.Module):
    """A graph with a flat calling convention plus the input/output specs that restore the
    original one (keyword inputs in, a Hugging Face ``ModelOutput`` out). Plain codegen keeps
    the graph picklable: torch re-traces its code on load."""

    def __init__(self, graph_module: torch.fx.GraphModule) -> None:
        super().__init__()
        info = getattr(graph_module.graph._codegen, "pytree_info", None)
        flat = copy_graph_module(graph_module)
        flat.graph._codegen = torch.fx.graph.CodeGen()
        flat.meta = {}  # capture-time example inputs and reports are not part of the model
        flat._tracer_cls = KernelLeafTracer  # export's tracer cannot be rebuilt on load
        flat._tracer_extras = {}
        flat.recompile()
        self.graph_module = flat
        self.in_spec = info.in_spec if info is not None else None
        self.out_spec = info.out_spec if info is not None else None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        outputs = self.graph_module(*flatten_with_spec(self.in_spec, args, kwargs))
        if self.out_spec is None:
            return outputs
        return pytree.tree_unflatten(list(outputs) if isinstance(outputs, (tuple, list)) else [outputs], self.out_spec)


def save_quantized(model: torch.fx.GraphModule, directory: str | pathlib.Path, info: dict[str, Any] | None = None,
                   *, overwrite: bool = False) -> pathlib.Path:
    """Write ``model`` (a fake-quant or lowered GraphModule) to ``directory/model.pt`` with a
    small JSON description. Refuses to replace an existing model unless ``overwrite``."""
    if not isinstance(model, (torch.fx.GraphModule, SavedModel)):
        raise DataError(
            f"save_quantized takes the model outlierfx.quantize (or lower) returned, a GraphModule; got a "
            f"{type(model).__name__}. Quantize it first: qmodel, report = outlierfx.quantize(model, calibration); for "
            f"backend='inductor' save qmodel.reference (the compiled model wraps it)"
        )
    directory = pathlib.Path(directory)
    target = directory / MODEL_FILE
    if target.exists() and not overwrite:
        raise OutlierFXError(f"{target} exists; choose another output directory or pass overwrite=True")
    directory.mkdir(parents=True, exist_ok=True)
    saved = model if isinstance(model, SavedModel) else SavedModel(model)
    tmp = target.with_suffix(".tmp")
    torch.save(saved, tmp)
    tmp.replace(target)  # atomic: a crash never leaves half a model under the final name
    payload = {"format": FORMAT_VERSION, "torch": torch.__version__, **(info or {})}
    (directory / INFO_FILE).write_text(json.dumps(payload, indent=2, default=str))
    return target


def load_quantized(directory: str | pathlib.Path) -> SavedModel:
    """Load a model written by :func:`save_quantized` (in any process)."""
    path = pathlib.Path(directory)
    path = path / MODEL_FILE if path.is_dir() else path
    if not path.is_file():
        raise OutlierFXError(f"no saved outlierfx model at {path}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized-tensor deprecation notices
        try:
            model = torch.load(path, weights_only=False)
        except Exception as exc:
            raise OutlierFXError(f"cannot load {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, SavedModel):
        raise OutlierFXError(f"{path} holds a {type(model).__name__}, not a model saved by outlierfx")
    return model.eval()


def size_on_disk_mb(path: str | pathlib.Path) -> float:
    """Size of a file, or of all files under a directory, in MB (10^6 bytes)."""
    path = pathlib.Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6
