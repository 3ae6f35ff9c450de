"""The tensors of a saved model: one safetensors entry per distinct tensor (quantized weights as
int8 codes with per-row scales: :mod:`outlierfx.quantizers.integer_codes`)."""

from __future__ import annotations

import torch

from ..errors import OutlierFXError
from ..graph.attrs import tensor_identity


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
