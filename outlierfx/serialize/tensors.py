"""The tensors of a saved model: one safetensors entry per distinct tensor, quantized weights as
int8 codes with per-row scales that rebuild the fake-quant weight bit for bit."""

from __future__ import annotations

import torch

from ..errors import OutlierFXError
from ..quantizers.fake_quant import quantize_to_integers, quantize_weight
from ..quantizers.spec import Estimator, Granularity, QuantSpec


def tensor_identity(tensor: torch.Tensor) -> tuple:
    """Equal for two names of the same tensor (same memory, offset, shape, strides and dtype)."""
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()),
            tensor.dtype)


class TensorWriter:
    """Collects the tensors to write under unique keys. The same tensor (same memory, shape and
    strides) is stored once and read back as one object, so tied weights stay tied."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._key_of: dict[tuple, str] = {}
        self._storages: set[int] = set()

    def add(self, name: str, tensor: torch.Tensor) -> str:
        tensor = tensor.detach()
        identity = tensor_identity(tensor)
        if identity in self._key_of:
            return self._key_of[identity]
        if tensor.device.type != "cpu":
            raise OutlierFXError(f"{name} is on {tensor.device}; move the model to the CPU before saving it")
        storage = identity[0]
        # safetensors refuses two entries over one memory block (slices of one parameter): copy
        value = tensor.clone(memory_format=torch.contiguous_format) if storage in self._storages \
            else tensor.contiguous()
        self._storages.add(storage)
        key = name
        while key in self.tensors:
            key += "_"
        self.tensors[key] = value
        self._key_of[identity] = key
        return key


def integer_weight(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Integer codes and float32 per-row scales with ``rebuild_weight(codes, scale) == weight``
    bit for bit, for a fake-quant weight on a symmetric per-row grid of <= 8 bits; None where
    there are none (another grid, or a row no scale reproduces exactly).

    The scale ConvertToFakeQuant used is not stored in the graph; min-max over the on-grid row
    recovers it to within one ulp, so each row tries that value and its two neighbours."""
    per_row = spec.granularity is Granularity.PER_CHANNEL and spec.axis % max(weight.dim(), 1) == 0
    if weight.dtype != torch.float32 or weight.dim() < 1 or not (spec.symmetric and per_row and spec.bits <= 8):
        return None
    w = weight.detach()
    _, scale, zero_point = quantize_weight(w, spec.with_(estimator=Estimator.MINMAX))
    codes = quantize_to_integers(w, scale, zero_point, spec)
    chosen = torch.full_like(scale, float("nan"))
    for candidate in (scale, torch.nextafter(scale, torch.full_like(scale, float("inf"))),
                      torch.nextafter(scale, torch.zeros_like(scale))):
        exact = _bits(rebuild_weight(codes, candidate)).eq(_bits(w)).reshape(w.shape[0], -1).all(1)
        chosen = torch.where(exact & chosen.isnan(), candidate, chosen)
    if bool(chosen.isnan().any()):
        return None
    return codes, chosen


def rebuild_weight(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float weight of :func:`integer_weight`'s codes: the same arithmetic as fake quantization."""
    return codes.to(torch.float32) * scale.reshape(-1, *([1] * (codes.dim() - 1)))


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)  # compares -0.0 and NaN payloads too
