"""outlierfx: outlier-aware quantization passes for transformer language models on torch.fx.

The names below (and every submodule, e.g. ``outlierfx.models``) load on first use (PEP 562), so
``import outlierfx`` costs milliseconds and imports neither torch nor transformers.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS: dict[str, str] = {
    "CaptureError": "errors",
    "DataError": "errors",
    "DistributedError": "errors",
    "ExportError": "errors",
    "OutlierFXError": "errors",
    "OutlierFXWarning": "errors",
    "PassError": "errors",
    "QuantizationReport": "api",
    "QuantizationResult": "api",
    "QuantizedCausalLM": "generation",
    "Recipe": "recipes",
    "RecipeError": "recipes",
    "RunGraphs": "api",
    "SavedFormatError": "errors",
    "SettingError": "errors",
    "capture": "graph",
    "compile_int8": "passes.lower",
    "default_backend": "backends",
    "export_onnx": "export",
    "load": "serialize",
    "lower": "api",
    "preset": "recipes",
    "quantize": "api",
    "save": "serialize",
}


def _submodules(folder: str) -> frozenset[str]:
    """Public modules and packages in ``folder`` (``os.listdir``: pkgutil would import inspect)."""
    names = set()
    for entry in os.listdir(folder):
        if entry.endswith(".py"):
            names.add(entry[:-3])
        elif os.path.isfile(os.path.join(folder, entry, "__init__.py")):
            names.add(entry)
    return frozenset(name for name in names if not name.startswith("_"))


_SUBMODULES = _submodules(os.path.dirname(__file__))

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on demand
    from .api import QuantizationReport, QuantizationResult, RunGraphs, lower, quantize
    from .backends import default_backend
    from .passes.lower import compile_int8
    from .errors import (CaptureError, DataError, DistributedError, ExportError, OutlierFXError, OutlierFXWarning,
                         PassError, SavedFormatError, SettingError)
    from .export import export_onnx
    from .generation import QuantizedCausalLM
    from .graph import capture
    from .recipes import Recipe, RecipeError, preset
    from .serialize import load, save


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*__all__, *_SUBMODULES, "__version__"})
