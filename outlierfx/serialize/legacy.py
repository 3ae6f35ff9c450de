"""The format before 2026-12-05: a pickled GraphModule in ``model.pt``.

Unpickling runs whatever code the file names, so :func:`outlierfx.load` opens such a folder only
with ``trust_pickle=True``. The classes below are what those pickles name (as
``outlierfx.serialize.SavedModel``); nothing writes this format any more.
"""

from __future__ import annotations

import math
import pathlib
import warnings
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from ..backends import runtime
from ..errors import OutlierFXError
from ..graph.probe import flatten_with_spec

MODEL_FILE = "model.pt"


class KernelLeafTracer(torch.fx.Tracer):
    """What torch re-traces a pickled graph's code with on load: outlierfx's run-time kernel
    functions are called, not traced into; their shape and value branches cannot take symbolic inputs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(autowrap_modules=(math, runtime))


class SavedModel(torch.nn.Module):
    """A pickled lowered graph with a flat calling convention plus the input/output specs that
    restore the original one (keyword inputs in, a Hugging Face ``ModelOutput`` out)."""

    graph_module: torch.fx.GraphModule
    in_spec: pytree.TreeSpec | None
    out_spec: pytree.TreeSpec | None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        outputs = self.graph_module(*flatten_with_spec(self.in_spec, args, kwargs))
        if self.out_spec is None:
            return outputs
        return pytree.tree_unflatten(list(outputs) if isinstance(outputs, (tuple, list)) else [outputs], self.out_spec)


def load_pickled(path: pathlib.Path) -> SavedModel:
    """Unpickle a ``model.pt`` (runs code named in the file: the caller asked for it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized-tensor deprecation notices
        try:
            model = torch.load(path, weights_only=False)
        except Exception as exc:
            raise OutlierFXError(f"cannot load {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, SavedModel):
        raise OutlierFXError(f"{path} holds a {type(model).__name__}, not a model saved by outlierfx")
    return model.eval()
