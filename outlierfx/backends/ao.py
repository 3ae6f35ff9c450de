"""torch.ao's quantized engines (``fbgemm``, ``x86``, ``qnnpack``): packed int8 GEMMs, eagerly.

The reference form (:mod:`.reference`), then the eager stage (:mod:`.eager`): ``quantize ->
Linear -> quantize`` becomes one :class:`~.int8_linear.QuantizedLinear` (int8 GEMM with the
requantization fused); a Linear whose output stays float uses the engine's float-output int8
GEMM (fbgemm/x86) or, on qnnpack, which has none, a float GEMM on the dequantized weight
(listed as a fallback, as are PEG-grouped inputs there).
"""

from __future__ import annotations

import torch
import torch.fx

from ..quantizers.spec import Granularity
from .base import Backend
from .capabilities import BackendError, Capabilities, Execution, FirstTokens
from .eager import EagerLowering
from .int8_linear import EAGER_ENGINES, FLOAT_OUTPUT_ENGINES, FUSED_POST_OPS
from .kernel import LowerPlan
from .reference import lower_reference_form


def engine_capabilities(engine: str) -> Capabilities:
    """What ``engine``'s int8 kernels (:mod:`.int8_linear`) run."""
    float_output = engine in FLOAT_OUTPUT_ENGINES
    first_tokens = {"onednn": FirstTokens.CORRECTED}.get(engine, FirstTokens.TWO_GEMMS)
    return Capabilities(
        whole_gemm_granularities=frozenset({Granularity.PER_TENSOR}),
        peg_sub_gemms=float_output,
        first_token_rows=first_tokens if float_output else FirstTokens.NONE,
        unsigned_activations_only=True,
        post_ops=FUSED_POST_OPS[engine],
        bf16_attention=engine == "onednn",  # its GEMMs can write bfloat16
        float_output_gemm=float_output,
        execution=Execution.EAGER_KERNELS,
    )


class AoBackend(Backend):
    """One eager engine: ``fbgemm``, ``x86``, ``qnnpack`` (onednn: :class:`~.onednn.OnednnBackend`)."""

    def __init__(self, engine: str) -> None:
        if engine not in EAGER_ENGINES:
            raise BackendError(f"{engine!r} is not a torch.ao engine; choose one of {', '.join(EAGER_ENGINES)}")
        self.name = engine
        self.capabilities = engine_capabilities(engine)

    def check_available(self) -> None:
        engines = torch.backends.quantized.supported_engines
        if self.name not in engines:
            have = ", ".join(e for e in engines if e in EAGER_ENGINES) or "none"
            raise BackendError(f"backend {self.name!r} is not available on this CPU (this torch build has: {have})")

    def lower(self, gm: torch.fx.GraphModule, plan: LowerPlan) -> None:
        lower_reference_form(gm, plan)
        EagerLowering(gm, self.name, self.capabilities).run()
