"""Run-time functions the lowered graphs call, and the CPU probes that pick a backend.

The functions here are graph nodes of lowered models (first-token grids, the attention-mask
check, bf16 attention): :mod:`outlierfx.serialize` re-traces saved graphs with this module
as a leaf, so their shape and value branches never meet symbolic inputs.

torch 2.13 deprecates quantized tensors and warns when one is made; the functions that make
them silence that warning locally (:func:`quantized_tensors_quietly`), never process-wide.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

from ..graph.first_tokens import rows_of


@contextlib.contextmanager
def quantized_tensors_quietly() -> Iterator[None]:
    """Ignore torch's quantized-tensor deprecation warnings inside the block only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", message=r".*quantized tensors are deprecated.*")
        yield


def has_int8_instructions() -> bool:
    """Whether this CPU has VNNI or AMX int8 instructions (torch's own CPU probe)."""
    probes = (getattr(torch.cpu, name, None) for name in ("_is_vnni_supported", "_is_amx_tile_supported"))
    return any(probe is not None and probe() for probe in probes)


def has_bf16_instructions() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (AVX512-BF16 or AMX)."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(torch.backends.mkldnn.is_available() and probe is not None and probe())


def cpu_description() -> str:
    """The CPU model and the int8/bf16 instructions the kernels use, for benchmark records:
    latency ratios differ by CPU (oneDNN's int8 GEMMs gain most with AMX)."""
    import pathlib
    import platform

    model = platform.processor() or platform.machine()
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    features = [name for name, present in (("VNNI", has_int8_instructions()), ("AMX", amx is not None and amx()),
                                           ("BF16", has_bf16_instructions())) if present]
    return f"{model} ({', '.join(features) or 'no VNNI/AMX/BF16'})"


@contextlib.contextmanager
def quantized_engine(engine: str) -> Iterator[None]:
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def uint8_codes(x: torch.Tensor) -> torch.Tensor:
    """The codes of a quint8 tensor as a plain uint8 tensor on the same memory (``int_repr``
    copies, at ~50x the cost on a 8 x 128 x 384 activation)."""
    if x.dtype != torch.quint8:
        raise TypeError(f"expected a quint8 tensor, got {x.dtype}")
    codes = torch.empty(0, dtype=torch.uint8, device=x.device)
    return codes.set_(x.untyped_storage(), x.storage_offset(), x.shape, x.stride())


def clamp_to_grid(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """A grid narrower than uint8 (A6, A4) saturates inside it: clamp there, so the codes match."""
    if (qmin, qmax) == (0, 255):
        return x
    return x.clamp((qmin - zero_point) * scale, (qmax - zero_point) * scale)


def bf16_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                   scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """Fused attention in bfloat16 on ``q``/``k``/``v`` that int8 GEMMs wrote in bfloat16;
    float output (the quantizer of the output projection's input reads it). An additive float
    mask is clamped to bfloat16's finite range (a float32 lowest value would round to -inf)."""
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.clamp(min=torch.finfo(torch.bfloat16).min).to(torch.bfloat16)
    bf16 = torch.bfloat16
    out = torch.nn.functional.scaled_dot_product_attention(q.to(bf16), k.to(bf16), v.to(bf16), attn_mask=attn_mask,
                                                           scale=scale, enable_gqa=enable_gqa)
    return out.float()


def two_grid_codes(x: torch.Tensor, n: int, scale: float, zero_point: int, sink_scale: float, sink_zero_point: int,
                   qmin: int = 0, qmax: int = 255, first: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 codes of ``x`` on ``(scale, zero_point)``, except each text's first ``n`` tokens of a
    ``[batch, seq, ...]`` input, on ``(sink_scale, sink_zero_point)``: the rows ``first`` marks
    (the graph's first-token mask), else the first ``n`` of a longer input (as
    ``FakeQuantize.on_grids`` simulates). A grid narrower than uint8 saturates at ``[qmin, qmax]``."""

    def codes(v: torch.Tensor, s: float, z: int) -> torch.Tensor:
        return uint8_codes(torch.quantize_per_tensor(clamp_to_grid(v, s, z, qmin, qmax).contiguous(), s, z, torch.quint8))

    with quantized_tensors_quietly():
        out = codes(x, scale, zero_point)
        rows = first_rows(x, n, first)
        if rows is not None:
            out[rows] = codes(x[rows], sink_scale, sink_zero_point)
    return out


def two_grid_dequantize(codes: torch.Tensor, n: int, scale: float, zero_point: int, sink_scale: float,
                        sink_zero_point: int, first: torch.Tensor | None = None) -> torch.Tensor:
    """The values of :func:`two_grid_codes`' codes, for the float ops that read them (torch's
    quint8 dequantize kernel: ~30x faster than ``fake_quantize_per_tensor_affine`` here)."""
    with quantized_tensors_quietly():
        values = torch._make_per_tensor_quantized_tensor(codes, scale, zero_point).dequantize()
        rows = first_rows(codes, n, first)
        if rows is not None:
            head = codes[rows].contiguous()
            values[rows] = torch._make_per_tensor_quantized_tensor(head, sink_scale, sink_zero_point).dequantize()
    return values


def first_rows(x: torch.Tensor, n: int, first: torch.Tensor | None) -> torch.Tensor | None:
    """The ``[batch, seq]`` mask of ``x``'s rows on a first-token grid of ``n`` tokens
    (:func:`~outlierfx.graph.first_tokens.rows_of`), or None where there are none (a decode
    step behind a filled cache; a tensor below rank 3): eager kernels then skip their work."""
    if not n or x.dim() < 3:
        return None
    rows = rows_of(first, x, n)
    return rows if bool(rows.any()) else None


def mask_or_none(bias: torch.Tensor) -> torch.Tensor | None:
    """An additive attention bias, or ``None`` where it is all zeros (a batch without padding):
    adding zeros changes no score, and torch's fused attention kernel runs ~10% faster without
    a mask (MiniLM, 8 x 12 heads x 128 x 32, 2 threads). One check per forward, shared by the
    layers; data-dependent, so eager engines only."""
    return None if not bool(bias.any()) else bias
