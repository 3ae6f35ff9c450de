"""Lower: a calibrated fake-quant graph becomes a graph of integer kernels.

The pass is the orchestration; the backends (:mod:`outlierfx.backends`) decide and rewrite:
``backend.plan`` says which kernel each Linear gets (a typed :class:`~outlierfx.backends.Kernel`),
which quantizers stay simulated and why; ``backend.lower`` carries the plan out. Every backend
starts from the reference form (integer quantize/dequantize ops, int8 weights;
:mod:`outlierfx.backends.reference`); the eager engines then call packed int8 kernels
(:mod:`~outlierfx.backends.ao`, :mod:`~outlierfx.backends.onednn`), inductor compiles the
reference form (:mod:`~outlierfx.backends.inductor`, :func:`compile_int8`). Exact up to
rounding ties (one quantization step at most, per lowered op).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
import torch.fx

from ..backends.base import MAX_SUB_GEMMS
from ..backends.capabilities import BackendError, Execution
from ..backends.inductor import CompiledInt8
from ..backends.kernel import LowerPlan
from ..backends.registry import BACKENDS, get_backend
from ..backends.runtime import has_bf16_instructions
from ..errors import PassError
from ..graph import meta
from ..graph.attrs import fetch_attr, set_attr, tensor_identity
from ..graph.canonicalize import remove_dead_code
from ..graph.copy import copy_graph_module
from ..graph.weight_source import held_codes, with_checkpoint_tensors
from ..memory import return_freed_memory
from ..quantizers.integer_codes import HeldCodes, integer_weight, quantized_weights
from ..quantizers.observers import FakeQuantize
from .audit import AuditTrail
from .base import GraphPass, PassResult
from .fuse_attention import FuseAttention
from .manager import PassManager


@dataclasses.dataclass(frozen=True)
class LoweredFrom:
    """What a lowered graph was made from (``meta.GM_LOWERED_FROM``): the fake-quant graph and the
    ``Lower`` options. ``outlierfx.save`` writes this graph (:meth:`fake_quant`), not the kernels,
    and ``outlierfx.load`` lowers it again.

    The weights the int8 kernels replaced are held here as their int8 codes and per-row scales
    (``codes``), and as meta tensors in ``compact``: the float32 copies would cost four times the
    int8 weights, and more memory than the float model's own weights on SmolLM2 (the loaded int8
    model's RSS was 2.0 GB against FP32's 0.93 GB; docs/experiments/memory.md). Everything else
    is the fake-quant graph's own tensors, shared with the lowered graph."""

    compact: torch.fx.GraphModule
    backend: str
    max_sub_gemms: int
    bf16_attention: bool
    codes: Mapping[str, HeldCodes] = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, source: torch.fx.GraphModule, lowered: torch.fx.GraphModule, backend: str, max_sub_gemms: int,
           bf16_attention: bool) -> LoweredFrom:
        """``source`` with every on-grid weight that ``lowered`` no longer reads held as codes
        (those a graph captured without weights holds already, or those of its float weight).
        Tied weights (one tensor under several targets) share one pair of codes, so
        :meth:`fake_quant` ties them again and ``save`` writes them once, as before."""
        in_use = {tensor_identity(t) for t in [*lowered.parameters(), *lowered.buffers()]}
        kernel_rows = _KernelRows(lowered)
        compact = copy_graph_module(source)
        codes: dict[str, HeldCodes] = {}
        by_identity: dict[tuple, HeldCodes | None] = {}
        compact.meta.pop(meta.GM_WEIGHT_SOURCE, None)  # the lowered model runs on what it holds
        for target, spec in quantized_weights(source).items():
            weight = fetch_attr(source, target)
            loaded = held_codes(source, target)
            identity = (id(loaded),) if loaded is not None else tensor_identity(weight)
            if identity in in_use:
                continue
            if identity not in by_identity:
                found = loaded if loaded is not None else integer_weight(weight, spec)
                by_identity[identity] = None if found is None else HeldCodes(kernel_rows.find(found.codes), found.scale)
            held = by_identity[identity]
            if held is not None:
                codes[target] = held
                set_attr(compact, target, _as_kind_of(weight, torch.empty_like(weight, device="meta")))
        return cls(compact, backend, max_sub_gemms, bf16_attention, codes)

    def fake_quant(self) -> torch.fx.GraphModule:
        """The fake-quant graph with its float weights rebuilt from the codes, bit for bit."""
        graph = copy_graph_module(self.compact)
        rebuilt: dict[int, torch.Tensor] = {}
        for target, held in self.codes.items():
            if id(held) not in rebuilt:
                rebuilt[id(held)] = held.weight()
            set_attr(graph, target, _as_kind_of(fetch_attr(self.compact, target), rebuilt[id(held)]))
        return graph


def _as_kind_of(original: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` registered as ``original`` was: a Parameter (with its requires_grad) or a buffer."""
    if isinstance(original, torch.nn.Parameter):
        return torch.nn.Parameter(value, requires_grad=original.requires_grad)
    return value


class _KernelRows:
    """The int8 rows a lowered graph's kernels already hold, found by content: a weight's codes
    are then a view of the kernel's buffer (a row range of a merged Q/K/V or gate/up weight),
    not a third int8 copy next to the kernel's buffer and its packed form."""

    def __init__(self, lowered: torch.fx.GraphModule) -> None:
        # each buffer with its rows' fingerprints as one int64 tensor: a dict entry per row was
        # 1.3M Python objects (80 MB) on SmolLM2, whose freed pages stayed resident
        self._buffers: list[tuple[torch.Tensor, torch.Tensor]] = [
            (buffer, self._keys(buffer)) for buffer in {tensor_identity(t): t for t in lowered.buffers()}.values()
            if buffer.dtype == torch.int8 and buffer.dim() == 2 and buffer.is_contiguous()]

    @staticmethod
    def _keys(rows: torch.Tensor) -> torch.Tensor:
        # a row's fingerprint: its dot product with fixed pseudo-random weights (exact in int64),
        # 4,096 rows at a time: the int64 copy of SmolLM2's whole int8 table was 216 MB
        weights = torch.randint(-2**20, 2**20, (rows.shape[1],), generator=torch.Generator().manual_seed(0))
        return torch.cat([chunk.to(torch.int64) @ weights for chunk in rows.split(4096)])

    def find(self, codes: torch.Tensor) -> torch.Tensor:
        """A view of held rows equal to ``codes``, or ``codes`` itself where none holds them."""
        if codes.dim() != 2 or not len(codes):
            return codes
        first = self._keys(codes[:1])[0]
        for buffer, keys in self._buffers:
            if buffer.shape[1] != codes.shape[1]:
                continue
            for row in (keys == first).nonzero().flatten().tolist():
                rows = buffer[row:row + len(codes)]
                if rows.shape == codes.shape and torch.equal(rows, codes):
                    return rows
        return codes


class Lower(GraphPass[LowerPlan]):
    """Lower a fake-quant graph (the model ``outlierfx.quantize`` returns) to integer kernels.

    ``backend``: ``"onednn"`` (default on x86 CPUs with AVX512-VNNI or AMX: oneDNN's int8 GEMM in
    eager mode), ``"x86"``, ``"fbgemm"``, ``"qnnpack"`` (ARM; also runs on
    x86, slowly), ``"reference"`` or ``"inductor"`` (the decomposed form, for torch.compile).
    ``max_sub_gemms``: a Linear whose input has more PEG groups runs as one float GEMM on its
    int8 weights instead of that many int8 sub-GEMMs (same numerics up to summation order).
    ``bf16_attention`` (backends whose capabilities have it; default: where the CPU runs bf16
    natively): fused attention whose Q, K and V come straight from int8 GEMMs runs in bfloat16,
    the GEMMs writing bf16 (:mod:`outlierfx.backends.bf16_attention`).
    """

    output_rel_tol = None  # rounding ties may move a value by one step; the error is recorded

    def __init__(self, backend: str = "x86", max_sub_gemms: int | None = None, bf16_attention: bool | None = None) -> None:
        self.target = get_backend(backend)
        self.target.check_available()
        self.backend = backend
        self.max_sub_gemms = MAX_SUB_GEMMS if max_sub_gemms is None else max_sub_gemms
        supported = self.target.capabilities.bf16_attention
        if bf16_attention and not supported:
            able = " or ".join(n for n in BACKENDS if get_backend(n).capabilities.bf16_attention)
            raise BackendError(f"bf16 attention behind int8 GEMMs needs the {able} backend, not {backend}")
        # default: on where oneDNN runs bf16 natively (and so faster than float)
        self.bf16_attention = supported and (has_bf16_instructions() if bf16_attention is None else bf16_attention)

    @property
    def propagates_values(self) -> bool:
        # fake tensors cannot run packed int8 kernels
        return self.target.capabilities.execution is not Execution.EAGER_KERNELS

    def requires(self, gm: torch.fx.GraphModule) -> None:
        if not any(isinstance(m, FakeQuantize) for m in gm.modules()):
            raise PassError("the graph has no fake quantizers: lower the model outlierfx.quantize() returns")

    def analyze(self, gm: torch.fx.GraphModule) -> LowerPlan:
        return self.target.plan(gm, self.max_sub_gemms, self.bf16_attention)

    def apply(self, gm: torch.fx.GraphModule, plan: LowerPlan) -> bool:
        self.target.lower(gm, plan)
        remove_dead_code(gm)  # the float weights the int8 copies replaced
        return True

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        """On a graph captured without weights (issue 28, ``--low-memory``), the tensors it does
        not hold as codes are loaded (gains, biases, from the checkpoint or computed where a
        rewrite recorded them: the lowered model holds them) and the int8 kernels take the
        quantized weights' held codes: no quantized weight's float value is materialized, and
        the result is the full-memory lowering's model, which runs without the weight source."""
        if gm.meta.get(meta.GM_WEIGHT_SOURCE) is not None:
            gm = with_checkpoint_tensors(gm)
        result = super().__call__(gm)
        lowered = result.graph_module
        if lowered.meta.pop(meta.GM_WEIGHT_SOURCE, None) is not None:
            unloaded = [name for name, t in [*lowered.named_parameters(), *lowered.named_buffers()] if t.is_meta]
            if unloaded:
                raise PassError(f"the lowered graph still reads {unloaded[:4]} as weights held as codes, which no "
                                f"kernel of the {self.backend} backend takes; lower with the reference or onednn "
                                f"backend, or capture the model with its weights")
        result.graph_module.meta[meta.GM_LOWERED_FROM] = LoweredFrom.of(gm, result.graph_module, self.backend,
                                                                        self.max_sub_gemms, self.bf16_attention)
        if meta.GM_WEIGHT_SOURCE in gm.meta:
            # lowering's temporaries were freed between the kernels' buffers, and glibc kept them:
            # on SmolLM2 RSS stayed 420 MB above the conversion's
            return_freed_memory()
        return result


def lower_model(qmodel: torch.fx.GraphModule, backend: str, *, progress: bool = False,
                max_sub_gemms: int | None = None, bf16_attention: bool | None = None
                ) -> tuple[torch.nn.Module, AuditTrail]:
    """``FuseAttention`` then ``Lower(backend)`` under the pass manager's checks: the int8 model
    (inductor's compiled on first call, as :class:`CompiledInt8`) and the two passes' audit."""
    lowered = PassManager([FuseAttention(), Lower(backend, max_sub_gemms, bf16_attention)], progress=progress)(qmodel)
    model: torch.nn.Module = lowered.graph_module
    if backend == "inductor":
        model = CompiledInt8(lowered.graph_module)
    return model, lowered.audit


def compile_int8(model: torch.fx.GraphModule, *, dynamic: bool | None = None) -> CompiledInt8:
    """Lower a fake-quant graph to the reference int8 form and compile it with inductor.

    Compilation happens on the first call (tens of seconds for a small model on 2 cores)."""
    fused = FuseAttention()(model).graph_module  # attention without quantizers: one fused kernel
    return CompiledInt8(Lower("inductor")(fused).graph_module, dynamic)
