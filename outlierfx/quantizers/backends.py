"""Integer CPU backends: which torch.ao engines this machine has, and the int8 Linear module
that runs on them.

torch.ao's quantized engines (``fbgemm`` and ``x86`` on x86 CPUs, ``qnnpack`` for ARM, also
built on x86) execute ``quantized::linear`` with per-channel int8 weights and uint8 activations;
the requantization to the output's scale is fused into the kernel. Packed weights are specific
to the engine and the CPU, so :class:`QuantizedLinear` stores the plain int8 weight and packs it
on first use (also after loading a saved model in a new process).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

from ..errors import OutlierFXError

# torch 2.13 warns on every quantized tensor it creates (and prints the graph line that did it);
# choosing these engines is choosing quantized tensors, and the README says so once.
warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
warnings.filterwarnings("ignore", message=r".*quantized tensors are deprecated.*")

AO_ENGINES = ("fbgemm", "x86", "qnnpack")
BACKENDS = ("reference", "inductor", *AO_ENGINES)
# Engines whose packed weights implement a float-output int8 GEMM (input quantized inside).
_FLOAT_OUTPUT_ENGINES = ("fbgemm", "x86")


class BackendError(OutlierFXError):
    """The requested integer backend is unknown or not available on this CPU."""


def default_backend() -> str:
    """``x86`` where torch has it (x86 CPUs), else ``qnnpack`` (ARM)."""
    engines = torch.backends.quantized.supported_engines
    return "x86" if "x86" in engines else "qnnpack"


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name in AO_ENGINES and name not in torch.backends.quantized.supported_engines:
        have = ", ".join(e for e in torch.backends.quantized.supported_engines if e in AO_ENGINES) or "none"
        raise BackendError(f"backend {name!r} is not available on this CPU (this torch build has: {have})")
    return name


def has_float_output_kernel(engine: str) -> bool:
    return engine in _FLOAT_OUTPUT_ENGINES


@contextlib.contextmanager
def quantized_engine(engine: str) -> Iterator[None]:
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


class QuantizedLinear(torch.nn.Module):
    """``y = x W^T + b`` on an int8 kernel: ``x`` is quantized with the calibrated (static)
    ``in_scale``/``in_zero_point`` (uint8 grid ``[in_qmin, in_qmax]``), ``W`` is int8 per output
    channel. With ``out_qparams`` the kernel requantizes to that uint8 grid and returns a quint8
    tensor (the next int8 op reads it as is); without, the int32 accumulator is scaled to float
    (``fbgemm``/``x86`` only).
    """

    def __init__(self, weight_int8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 in_qparams: tuple[float, int, int, int], out_qparams: tuple[float, int] | None, engine: str) -> None:
        super().__init__()
        if weight_int8.dtype != torch.int8:
            raise ValueError(f"weight must be int8, got {weight_int8.dtype}")
        if out_qparams is None and not has_float_output_kernel(engine):
            raise BackendError(f"engine {engine} has no int8 GEMM with float output")
        self.register_buffer("weight_int8", weight_int8.contiguous())
        self.register_buffer("weight_scale", weight_scale.detach().double())  # no copy if already float64
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.in_scale, self.in_zero_point, self.in_qmin, self.in_qmax = float(in_qparams[0]), *map(int, in_qparams[1:])
        self.out_qparams = None if out_qparams is None else (float(out_qparams[0]), int(out_qparams[1]))
        self.engine = engine
        self._packed: object | None = None

    @property
    def in_features(self) -> int:
        return self.weight_int8.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight_int8.shape[0]

    def _pack(self) -> object:
        zeros = torch.zeros(self.out_features, dtype=torch.long)
        qweight = torch._make_per_channel_quantized_tensor(self.weight_int8, self.weight_scale, zeros, 0)
        with quantized_engine(self.engine), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch 2.13 warns that quantized tensors are deprecated
            self._packed = torch.ops.quantized.linear_prepack(qweight, self.bias)
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: float, or (with ``out_qparams``) already a quint8 tensor on the input grid.
        Returns the quint8 output with ``out_qparams``, else float."""
        packed = self._packed if self._packed is not None else self._pack()
        if not x.is_quantized and (self.in_qmin != 0 or self.in_qmax != 255):
            # a narrower grid (A6, A4): clamp where it saturates, so the codes match
            lo = (self.in_qmin - self.in_zero_point) * self.in_scale
            hi = (self.in_qmax - self.in_zero_point) * self.in_scale
            x = x.clamp(lo, hi)
        if self.out_qparams is None:
            return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
                x.contiguous(), self.in_scale, self.in_zero_point, packed)
        if not x.is_quantized:
            x = torch.quantize_per_tensor(x.contiguous(), self.in_scale, self.in_zero_point, torch.quint8)
        return torch.ops.quantized.linear(x, packed, *self.out_qparams)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_packed"] = None  # engine- and CPU-specific: packed again after loading
        return state

    def extra_repr(self) -> str:
        out = f"uint8 out (scale {self.out_qparams[0]:.3g})" if self.out_qparams else "float out"
        return f"{self.in_features} -> {self.out_features}, {self.engine}, {out}"
