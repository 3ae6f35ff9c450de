"""Integer backends, one module each: ``reference``, ``inductor``, ``onednn`` and the torch.ao
engines (``fbgemm``, ``x86``, ``qnnpack``). Each declares its :class:`Capabilities` and lowers
Linears to its kernels; :class:`Kernel` says which kernel each Linear gets."""

from .base import MAX_SUB_GEMMS, Backend
from .capabilities import BackendError, Capabilities, Execution, FirstTokens, PostOp
from .kernel import Fallback, Kernel, KernelKind, LoweredLinear, LowerPlan, Output
from .registry import BACKENDS, check_backend, default_backend, get_backend, runnable_backends

__all__ = [
    "BACKENDS", "MAX_SUB_GEMMS", "Backend", "BackendError", "Capabilities", "Execution", "Fallback", "FirstTokens",
    "Kernel", "KernelKind", "LowerPlan", "LoweredLinear", "Output", "PostOp", "check_backend", "default_backend",
    "get_backend", "runnable_backends",
]
