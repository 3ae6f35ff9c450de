"""Exporting quantized models to other runtimes: ONNX (QDQ) for ONNX Runtime.

``outlierfx.export_onnx(qmodel_or_folder, "model.onnx")`` writes the model's int8 form as a
QDQ ONNX model (:mod:`.qdq`); :class:`OnnxRuntimeModel` runs one in ONNX Runtime, called like
the torch model. Both need the ``onnx`` extra (``pip install 'outlierfx[onnx]'``). See
``docs/onnx.md``.
"""

from __future__ import annotations

from .qdq import check_exportable, export_onnx, graph_to_onnx
from .runtime import OnnxRuntimeModel

__all__ = ["OnnxRuntimeModel", "check_exportable", "export_onnx", "graph_to_onnx"]
