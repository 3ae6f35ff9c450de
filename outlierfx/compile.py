"""The non-deprecated int8 path: the lowered reference form compiled by torch.compile/inductor.

torch 2.13 deprecates quantized tensors (the torch.ao engines). Inductor instead pattern-matches
``dequantize -> linear -> quantize`` in the ``quantized_decomposed`` form that
:class:`~outlierfx.passes.lower.Lower` emits into fused oneDNN int8 kernels
(``onednn.qlinear_pointwise``) when weights are frozen as constants, and fuses the remaining
quantize/dequantize ops into the neighbouring elementwise kernels.

Entry points: :func:`compile_int8` (a fake-quant model, as ``outlierfx.quantize`` returns it ->
compiled int8) and ``outlierfx.quantize(..., backend="inductor")``, which does the same in one
call. A custom ``torch.compile(backend=...)`` cannot do this: inductor decides which weights are
frozen constants while dynamo traces, before a backend function runs, so the int8 weight
prepacking fails on weights that arrive as graph inputs (measured with torch 2.13).
"""

from __future__ import annotations

from typing import Any

import torch
import torch._inductor.config
import torch.fx

from .passes.fuse_attention import FuseAttention
from .passes.lower import Lower

INDUCTOR_OPTIONS = {"freezing": True}  # weights as constants: what the int8 GEMM patterns need


class CompiledInt8(torch.nn.Module):
    """A torch.compile'd int8 graph whose (re)compilations run with freezing on.

    Freezing must be set in inductor's global config while compiling: passed as
    ``torch.compile(options=...)`` it does not reach the int8 weight-prepacking patterns
    (torch 2.13: ``onednn.qlinear_prepack`` is then left on a graph input and fails)."""

    def __init__(self, reference: torch.fx.GraphModule, dynamic: bool | None = None) -> None:
        super().__init__()
        self.reference = reference
        self.compiled = torch.compile(reference, dynamic=dynamic)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch._inductor.config.patch(INDUCTOR_OPTIONS), torch.no_grad():
            return self.compiled(*args, **kwargs)


def compile_int8(model: torch.fx.GraphModule, *, dynamic: bool | None = None) -> CompiledInt8:
    """Lower a fake-quant graph to the reference int8 form and compile it with inductor.

    Compilation happens on the first call (tens of seconds for a small model on 2 cores)."""
    fused = FuseAttention()(model).graph_module  # attention without quantizers: one fused kernel
    return CompiledInt8(Lower("inductor")(fused).graph_module, dynamic)
