"""ONNX forms of outlierfx's own torch ops, for ``torch.onnx.export(custom_translation_table=...)``.

torch.onnx's library covers the aten and ``quantized_decomposed`` ops our graphs hold; these are
the ops only outlierfx registers. Each is written with ONNX Script ops and traced into the graph
(no ONNX function, no custom domain), so any ONNX runtime runs it.
"""

from __future__ import annotations

from typing import Any

from ..graph.hadamard_op import HADAMARD


def _hadamard(x: Any, left: Any, right: Any) -> Any:
    """:data:`~outlierfx.graph.hadamard_op.HADAMARD` as the op computes it: the last axis viewed as
    ``c x p`` rows X, ``left^T X right``, two small batched MatMuls (``c + p`` multiply-adds per
    element, not the ``c * p`` of one MatMul by ``kron(left, right)``)."""
    from onnxscript import opset18 as op

    shape = op.Shape(x)
    c = op.Shape(left, start=0, end=1)
    p = op.Shape(right, start=0, end=1)
    rows = op.MatMul(op.Reshape(x, op.Concat(op.Constant(value_ints=[-1]), c, p, axis=0)), right)  # (n, c, p)
    rows = op.MatMul(op.Transpose(rows, perm=[0, 2, 1]), left)  # (n, p, c): each column of X times left
    return op.Reshape(op.Transpose(rows, perm=[0, 2, 1]), shape)


TRANSLATIONS: dict[Any, Any] = {HADAMARD: _hadamard}
"""Each torch op of outlierfx's own, by its overload, and its ONNX form."""
