"""The op vocabulary of saved graphs: the functions a saved graph may call, by name.

A saved graph names each ``call_function`` target by its key in :data:`OPS`; loading looks the
name up here and nowhere else (no import by name, no unpickling), so a file can only call what
this table lists. The table covers the canonical graphs outlierfx's passes produce before
lowering (captured with ``torch.export``, canonicalized, fake-quantized, attention fused).

A pass that adds a new kind of node registers its target with one line: a torch operator as
``"<name>.<overload>"`` in ``_ATEN``, a function of outlierfx's own by its module path inside the
package, e.g. ``"graph.ops.hadamard": ops.hadamard,`` in :data:`OPS`. Keys are stable: renaming
one makes older files unreadable.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch

from ..graph.hadamard_op import HADAMARD

# aten operators by their ``<name>.<overload>``: the canonical ops (outlierfx.graph.ops) and the
# layout, arithmetic and mask-building ops export leaves around them in transformer graphs
_ATEN = (
    "__and__.Tensor", "__or__.Tensor", "abs.default", "add.Tensor", "alias.default", "any.default", "arange.default",
    "arange.start", "arange.start_step", "bmm.default", "cat.default", "clamp.default", "clone.default",
    "contiguous.default", "cos.default", "cumsum.default", "detach.default", "div.Tensor", "dropout.default",
    "embedding.default", "eq.Scalar", "eq.Tensor", "exp.default", "expand.default", "full.default",
    "full_like.default", "gather.default", "ge.Scalar", "ge.Tensor", "gelu.default", "gt.Scalar", "gt.Tensor",
    "index.Tensor", "index_select.default", "layer_norm.default", "le.Scalar", "le.Tensor", "linear.default",
    "lt.Scalar", "lt.Tensor", "masked_fill.Scalar", "matmul.default", "max.default", "mean.dim", "mm.default",
    "mul.Scalar", "mul.Tensor", "ne.Scalar", "neg.default", "new_ones.default", "new_zeros.default", "ones.default",
    "permute.default", "pow.Tensor_Scalar", "relu.default", "repeat.default", "reshape.default",
    "rms_norm.default", "rsqrt.default", "scaled_dot_product_attention.default", "select.int", "sigmoid.default",
    "silu.default", "sin.default", "slice.Tensor", "softmax.int", "split.Tensor", "split_with_sizes.default",
    "sqrt.default", "squeeze.dim", "squeeze.dims", "sub.Tensor", "sum.dim_IntList", "sym_size.int", "tanh.default",
    "to.device", "to.dtype", "to.dtype_layout", "transpose.int", "tril.default", "triu.default",
    "type_as.default", "unsqueeze.default", "view.default", "where.Scalar", "where.ScalarOther",
    "where.ScalarSelf", "where.self", "zeros.default", "zeros_like.default", "_unsafe_view.default",
)


def _aten(name: str) -> Any:
    op, overload = name.rsplit(".", 1)
    return getattr(getattr(torch.ops.aten, op), overload)


OPS: dict[str, Callable[..., Any]] = {
    **{f"aten.{name}": _aten(name) for name in _ATEN},
    "operator.getitem": operator.getitem,
    "outlierfx.hadamard.default": HADAMARD,  # RotateFFN's online Hadamard transform
}
"""Name -> function: every ``call_function`` target a saved graph may hold."""


def names_by_target() -> dict[object, str]:
    """Function -> vocabulary name, over the table as it is now (entries added after import too)."""
    return {fn: name for name, fn in OPS.items()}
