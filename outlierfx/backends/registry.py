"""The backends by name, and the default for this CPU."""

from __future__ import annotations

import torch

from .ao import AoBackend
from .base import Backend
from .capabilities import BackendError
from .inductor import InductorBackend
from .onednn import OnednnBackend
from .reference import ReferenceBackend
from .runtime import has_int8_instructions

BACKENDS = ("reference", "inductor", "fbgemm", "x86", "qnnpack", "onednn")


def get_backend(name: str) -> Backend:
    """The backend called ``name`` (a fresh object; backends hold no state between calls)."""
    if name == "reference":
        return ReferenceBackend()
    if name == "inductor":
        return InductorBackend()
    if name == "onednn":
        return OnednnBackend()
    if name in ("fbgemm", "x86", "qnnpack"):
        return AoBackend(name)
    raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def check_backend(name: str) -> str:
    """``name``, if it is a backend this CPU and torch build run; else :class:`BackendError`."""
    get_backend(name).check_available()
    return name


def default_backend() -> str:
    """``onednn`` on x86 CPUs with int8 dot-product instructions (VNNI or AMX), ``x86`` on
    other x86 CPUs, else ``qnnpack`` (ARM)."""
    engines = torch.backends.quantized.supported_engines
    if "onednn" in engines and has_int8_instructions():
        return "onednn"
    return "x86" if "x86" in engines else "qnnpack"


def runnable_backends(names: tuple[str, ...] | list[str]) -> list[str]:
    """Those of ``names`` this machine can run (``check_backend`` accepts), in the given order."""
    runnable = []
    for name in names:
        try:
            check_backend(name)
        except BackendError:
            continue
        runnable.append(name)
    return runnable
