"""Integer codes of the weights ConvertToFakeQuant put on a grid: the fake-quant graph holds such a
weight as float32 values ``codes * scale`` (``(codes - zero point) * scale`` on an asymmetric
grid), which int8 codes and per-row float32 scales rebuild bit for bit (:class:`HeldCodes`). The
saved format stores them (:mod:`outlierfx.serialize`), a lowered model holds them instead of the
float copies (:class:`~outlierfx.passes.lower.LoweredFrom`), and so does the weight source of a
graph captured without weights once converted (:func:`~outlierfx.graph.weight_source.hold`),
from which ``Lower`` builds its kernels."""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from ..errors import PassError
from ..graph import meta
from ..graph.ops import OpKind, op_kind
from .fake_quant import integer_dtype, quantize_to_integers, quantize_weight
from .spec import Estimator, Granularity, QuantSpec


@dataclasses.dataclass(frozen=True, eq=False)  # one object per weight: targets sharing it share one tensor
class HeldCodes:
    """A weight on a per-row integer grid, held as its int8 kernel codes (:func:`kernel_weight_spec`)
    and float32 per-row scales (:func:`integer_weight`): a quarter of the float size, and what the int8 kernels read;
    :meth:`weight` is the float weight bit for bit."""

    codes: torch.Tensor
    scale: torch.Tensor

    def weight(self) -> torch.Tensor:
        """The float weight: the same arithmetic as fake quantization."""
        return _rebuild(self.codes, self.scale)


def quantized_weights(gm: torch.fx.GraphModule) -> dict[str, QuantSpec]:
    """get_attr target -> spec, for the weights ConvertToFakeQuant put on an integer grid."""
    found = {}
    for node in gm.graph.nodes:
        spec = node.meta.get(meta.WEIGHT_QUANT)
        position = {OpKind.LINEAR: 1, OpKind.EMBEDDING: 0}.get(op_kind(node))  # type: ignore[arg-type]
        if spec is None or position is None or len(node.args) <= position:
            continue
        weight = node.args[position]
        if isinstance(weight, torch.fx.Node) and weight.op == "get_attr":
            found[str(weight.target)] = spec
    return found


def kernel_weight_spec(spec: QuantSpec) -> QuantSpec:
    """The symmetric grid an int8 kernel runs a weight on: ``spec`` itself where symmetric. An
    asymmetric b-bit row's values ``(k - zero point) * scale`` are the codes ``k - zero point`` in
    ``[-(2^b - 1), 2^b - 1]`` of the symmetric (b+1)-bit grid at the same scale: the zero point
    folds into the codes, so an int8 GEMM needs no correction term for it (an int4 kernel that
    stores ``k`` itself adds the activation row's sum times the zero point instead)."""
    return spec if spec.symmetric else spec.with_(bits=spec.bits + 1, symmetric=True, signed=True)


def kernel_codes(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes on :func:`kernel_weight_spec`'s grid and per-row scales of a weight on ``spec``'s
    per-row grid: min-max over an on-grid row recovers its scale (to within one ulp) and zero point."""
    _, scale, zero_point = quantize_weight(weight, spec.with_(estimator=Estimator.MINMAX))
    codes = quantize_to_integers(weight, scale, zero_point, spec)
    if not spec.symmetric:
        codes = codes.to(torch.int16) - zero_point.reshape(-1, *([1] * (weight.dim() - 1)))
    return codes.to(integer_dtype(kernel_weight_spec(spec))), scale


def integer_weight(weight: torch.Tensor, spec: QuantSpec) -> HeldCodes | None:
    """Integer codes and float32 per-row scales whose :meth:`~HeldCodes.weight` is ``weight``
    bit for bit, for a fake-quant weight on a per-row grid whose kernel codes are int8
    (:func:`kernel_weight_spec`: symmetric of <= 8 bits, asymmetric of <= 7); None where there
    are none (another grid, or a row no scale reproduces exactly).

    The scale ConvertToFakeQuant used is not stored in the graph; min-max over the on-grid row
    recovers it to within one ulp, so each row tries that value and its two neighbours."""
    per_row = spec.granularity is Granularity.PER_CHANNEL and spec.axis % max(weight.dim(), 1) == 0
    if weight.dtype != torch.float32 or weight.dim() < 1 or not (per_row and kernel_weight_spec(spec).bits <= 8):
        return None
    w = weight.detach()
    codes, scale = kernel_codes(w, spec)
    chosen = torch.full_like(scale, float("nan"))
    for candidate in (scale, torch.nextafter(scale, torch.full_like(scale, float("inf"))),
                      torch.nextafter(scale, torch.zeros_like(scale))):
        exact = _bits(_rebuild(codes, candidate)).eq(_bits(w)).reshape(w.shape[0], -1).all(1)
        chosen = torch.where(exact & chosen.isnan(), candidate, chosen)
    if bool(chosen.isnan().any()):
        return None
    return HeldCodes(codes, chosen)


def quantize_to_codes(weight: torch.Tensor, spec: QuantSpec, rows: int = 4096) -> HeldCodes | None:
    """:func:`integer_weight` of ``quantize_weight(weight, spec)[0]``, computed ``rows`` rows at a
    time: on a per-row grid each row is quantized on its own, so neither the whole float
    quantized weight nor the temporaries of quantizing it (four times an embedding table, 450 MB
    on SmolLM2's) exist at once. None where :func:`integer_weight` has no codes."""
    if not (spec.granularity is Granularity.PER_CHANNEL and weight.dim() >= 1 and spec.axis % weight.dim() == 0):
        return None  # rows are not quantized on their own
    pairs = []
    for chunk in weight.detach().split(rows):
        pair = integer_weight(quantize_weight(chunk, spec)[0], spec)
        if pair is None:
            return None
        pairs.append(pair)
    return HeldCodes(torch.cat([pair.codes for pair in pairs]), torch.cat([pair.scale for pair in pairs]))


def codes_required(what: str, weight: torch.Tensor, spec: QuantSpec) -> PassError:
    """The refusal of ``weight`` (``what`` names it and what put it there) on a grid whose values no
    :class:`HeldCodes` hold: a graph captured without weights keeps its rewritten and quantized
    weights only as codes (holding a float copy would cost the full model's weights again)."""
    return PassError(f"{what} ({weight.dtype}) is on a grid ({spec.describe()}) whose values no int8 codes with "
                     f"float32 per-row scales hold, which a graph captured without weights needs (it holds its "
                     f"quantized weights as codes); use a per-row weight spec with int8 codes (symmetric of at most "
                     f"8 bits, asymmetric of at most 7) on float32 weights, or quantize the loaded model")


def _rebuild(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.to(torch.float32) * scale.reshape(-1, *([1] * (codes.dim() - 1)))


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)  # compares -0.0 and NaN payloads too
