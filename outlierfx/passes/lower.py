"""Lower: a calibrated fake-quant graph becomes a graph of integer kernels.

Two stages, both exact up to rounding ties (one quantization step at most, per lowered op):

1. Reference form (every backend). Each ``FakeQuantize`` becomes ``quantize -> dequantize``
   of torch's ``quantized_decomposed`` library (uint8/int8 codes between them), each quantized
   Linear weight an int8 tensor behind ``dequantize_per_channel``, each quantized embedding
   table an int8 table whose gathered rows are scaled. This is the form inductor's x86 int8
   patterns match (``backend="inductor"``: compile it with :func:`outlierfx.compile_int8`).
   A Linear reading a PEG-grouped activation becomes K sub-GEMMs over contiguous channel
   groups, each with its own activation scale, summed in float; the group permutation is
   folded into the weight columns, so only the input is gathered, once.
2. Eager int8 engines (torch.ao's ``fbgemm``, ``x86``, ``qnnpack``, and ``onednn``).
   ``quantize -> Linear -> quantize`` becomes one
   :class:`~outlierfx.quantizers.backends.QuantizedLinear` (int8 GEMM with the requantization
   fused); a Linear whose output stays float uses the engine's float-output int8 GEMM
   (fbgemm/x86/onednn) or, on qnnpack, which has none, a float GEMM on the dequantized weight
   (listed as a fallback). On onednn more goes into the GEMM: a following GELU (and the
   quantize after it, so the next GEMM reads uint8 straight away), or the residual add that
   reads the output (a binary post-op); and a value read by several Linears (Q, K, V) is
   quantized once. Quantize-dequantize pairs left around other ops become torch's fused
   fake-quantize kernels: those ops run in float on values that are exactly on the int8 grid.
   A per-channel scale the graph keeps (a Quadapter ``x * s`` on a GELU output, a post-LN
   compensation) scales its temporary in place. Fused attention skips an all-zero mask at run
   time (:func:`~outlierfx.quantizers.backends.mask_or_none`).

Quantizers wider than 8 bit (the ``mp16`` policy) have no integer kernel and stay simulated.
Quantizers whose first tokens have a grid of their own (``QuantSpec.sink_tokens``) become, in
the reference form, a main-grid quantize of the whole tensor plus a quantize of its first rows,
and the row-wise ops after them run on those rows beside the main graph
(:mod:`~outlierfx.passes.first_rows`: each Linear one more int8 GEMM of ``batch x n`` rows).
The eager engines make them two-grid uint8 codes
(:func:`~outlierfx.quantizers.backends.two_grid_codes`). A float-output Linear reading them runs
in int8 (x86/fbgemm: two GEMMs; onednn: one GEMM on the codes, shared by Q/K/V, whose first
rows are corrected in closed form, or, where a GELU, a residual add or the requantization to a
first-token-grid output is fused, recomputed by a GEMM of batch x n rows with the same
post-ops), and other readers get the codes dequantized. The plan lists what stays simulated.
"""

from __future__ import annotations

import dataclasses
import operator
import warnings

import torch
import torch.fx

from ..errors import PassError
from ..graph import meta
from ..graph.attrs import del_attr, fetch_attr, set_attr, unique_attr_name
from ..graph.canonicalize import remove_dead_code
from ..graph.ops import OpKind, is_call, op_kind, tensor_val
from ..quantizers.backends import (
    AO_ENGINES,
    GELU_ENGINES,
    RESIDUAL_ENGINES,
    BackendError,
    QuantizedLinear,
    check_backend,
    has_bf16_instructions,
    has_float_output_kernel,
    mask_or_none,
    two_grid_codes,
    two_grid_dequantize,
)
from ..quantizers.fake_quant import integer_dtype, quantize_to_integers, quantize_weight
from ..quantizers.observers import FakeQuantize
from ..quantizers.spec import Estimator, Granularity, QuantSpec
from .base import GraphPass
from .bf16_attention import read_by_attention_only, use_bf16_attention, use_bf16_attention_in_reference_form
from .first_rows import FIRST_ROWS_UNREAD, first_rows_of_value, follow_first_rows
from .fuse_attention import SDPA

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import torch.ao.quantization.fx._decomposed  # registers the quantized_decomposed ops

qd = torch.ops.quantized_decomposed
aten = torch.ops.aten
Q_TENSOR, DQ_TENSOR = qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default
Q_CHANNEL, DQ_CHANNEL = qd.quantize_per_channel.default, qd.dequantize_per_channel.default
LINEAR_MODULE_PREFIX = "outlierfx_int8_linear_"
REFERENCE_FORMS = ("reference", "inductor")
BF16_ATTENTION_BACKENDS = ("onednn", "inductor")  # both run oneDNN's int8 GEMMs, which can write bf16
_NDIM = "outlierfx_lower_ndim"  # rank of a per-channel quantized tensor (stage 2 has no fake shapes)


@dataclasses.dataclass(frozen=True)
class LoweredLinear:
    node: str
    module_path: str
    kernel: str  # e.g. "int8 GEMM, requantized uint8 output", "6 int8 sub-GEMMs (PEG)", "float GEMM (...)"
    groups: int = 0  # > 0: split into this many int8 sub-GEMMs over PEG channel groups

    @property
    def is_int8(self) -> bool:
        return not self.kernel.startswith("float")


@dataclasses.dataclass(frozen=True)
class LowerPlan:
    backend: str
    linears: tuple[LoweredLinear, ...]
    activations: int  # quantizers lowered to integer quantize/dequantize
    embeddings: int  # int8 embedding tables
    simulated: tuple[tuple[str, str], ...]  # (tensor, why) quantizers with no integer kernel
    bf16_attention: bool = False  # fused attention behind int8 Q/K/V GEMMs runs in bfloat16

    def summary(self) -> str:
        int8 = sum(1 for lin in self.linears if lin.is_int8)
        kinds: dict[str, int] = {}
        for lin in self.linears:
            kinds[lin.kernel] = kinds.get(lin.kernel, 0) + 1
        lines = [f"backend {self.backend}: {int8}/{len(self.linears)} Linears on int8 kernels; "
                 f"{self.activations} activation quantizers as integer quantize/dequantize; "
                 f"{self.embeddings} int8 embedding tables"]
        lines += [f"  {n} x {kernel}" for kernel, n in sorted(kinds.items())]
        if self.bf16_attention:
            lines.append("  fused attention whose Q, K, V come straight from int8 GEMMs: in bfloat16")
        if self.simulated:
            lines.append(f"  {len(self.simulated)} quantizers without an integer kernel stay simulated "
                         f"(e.g. {self.simulated[0][0]}: {self.simulated[0][1]})")
        return "\n".join(lines)


class Lower(GraphPass[LowerPlan]):
    """Lower a fake-quant graph (the model ``outlierfx.quantize`` returns) to integer kernels.

    ``backend``: ``"onednn"`` (default on x86 CPUs with AVX512-VNNI or AMX: oneDNN's int8 GEMM in
    eager mode), ``"x86"``, ``"fbgemm"``, ``"qnnpack"`` (ARM; also runs on
    x86, slowly), ``"reference"`` or ``"inductor"`` (the decomposed form, for torch.compile).
    ``max_sub_gemms``: a Linear whose input has more PEG groups runs as one float GEMM on its
    int8 weights instead of that many int8 sub-GEMMs (same numerics up to summation order).
    ``bf16_attention`` (onednn and inductor; default: where the CPU runs bf16 natively): fused
    attention whose Q, K and V come straight from int8 GEMMs runs in bfloat16, the GEMMs writing
    bf16 (:mod:`outlierfx.passes.bf16_attention`).
    """

    output_rel_tol = None  # rounding ties may move a value by one step; the error is recorded

    def __init__(self, backend: str = "x86", max_sub_gemms: int | None = None, bf16_attention: bool | None = None) -> None:
        self.backend = check_backend(backend)
        self.max_sub_gemms = MAX_SUB_GEMMS if max_sub_gemms is None else max_sub_gemms
        if bf16_attention and self.backend not in BF16_ATTENTION_BACKENDS:
            raise BackendError(f"bf16 attention behind int8 GEMMs needs the onednn or inductor backend, "
                               f"not {self.backend}")
        # default: on where oneDNN runs bf16 natively (and so faster than float)
        self.bf16_attention = self.backend in BF16_ATTENTION_BACKENDS and (
            has_bf16_instructions() if bf16_attention is None else bf16_attention)

    @property
    def propagates_values(self) -> bool:
        return self.backend not in AO_ENGINES  # fake tensors cannot run packed int8 kernels

    def requires(self, gm: torch.fx.GraphModule) -> None:
        if not any(isinstance(m, FakeQuantize) for m in gm.modules()):
            raise PassError("the graph has no fake quantizers: lower the model outlierfx.quantize() returns")

    def analyze(self, gm: torch.fx.GraphModule) -> LowerPlan:
        linears, simulated, activations = [], [], 0
        for node in gm.graph.nodes:
            module = _fake_quantizer(gm, node)
            if module is not None and module.enabled:
                reason = _no_integer_kernel(module, self.backend)
                if reason is not None:
                    simulated.append((module.name or node.name, reason))
                else:
                    activations += 1
            if op_kind(node) is OpKind.LINEAR:
                linears.append(LoweredLinear(node.name, meta.module_path(node), *self._kernel(gm, node)))
        embeddings = sum(1 for n in gm.graph.nodes if op_kind(n) is OpKind.EMBEDDING and meta.WEIGHT_QUANT in n.meta)
        if self.backend in ("onednn", "inductor"):
            linears = _label_merged(gm, linears, attention_only=self.backend == "inductor")
        return LowerPlan(self.backend, tuple(linears), activations, embeddings, tuple(simulated), self.bf16_attention)

    def _kernel(self, gm: torch.fx.GraphModule, linear: torch.fx.Node) -> tuple[str, int]:
        """The kernel a Linear gets, and its number of PEG sub-GEMMs (0: not split)."""
        if meta.WEIGHT_QUANT not in linear.meta:
            return "float GEMM (weight not quantized by the policy)", 0
        source = linear.args[0]
        module = _fake_quantizer(gm, source) if isinstance(source, torch.fx.Node) else None
        if module is None or not module.enabled:
            return "float GEMM on int8 weights (input not quantized by the policy)", 0
        if self.backend in AO_ENGINES and _sink_linear_lowers(gm, linear, module, self.backend):
            if self.backend != "onednn":
                return "int8 GEMM, float output; first token(s) on their own input grid (2 GEMMs)", 0
            gelu = _fusable_gelu(linear) is not None
            requantized = _sink_output(gm, next(iter(linear.users)) if gelu else linear, module) is not None
            residual = "" if gelu or requantized else self._residual_label(linear)
            kernel = ("int8 GEMM" + (", GELU fused" if gelu else "")
                      + (", requantized uint8 output" if requantized else ", float output") + residual)
            fused = gelu or requantized or bool(residual)
            how = "their rows again, by a batch x n GEMM" if fused else "their rows corrected in closed form"
            return f"{kernel}; first token(s) on their own grid ({how})", 0
        if self.backend in REFERENCE_FORMS and _two_grids_split(module):
            output = "requantized" if _output_quantizer(gm, linear) is not None else "float"
            return f"int8 GEMM, {output} output; first token(s) on their own grid (their rows again, by a second GEMM)", 0
        simulated = _no_integer_kernel(module)
        if simulated is not None:
            return f"float GEMM on int8 weights (input simulated: {simulated})", 0
        grouped = not _single_grid(module)
        if self.backend in AO_ENGINES and not has_float_output_kernel(self.backend):
            if grouped:
                return f"float GEMM on int8 weights ({self.backend} has no float-output int8 GEMM for PEG groups)", 0
            if _output_quantizer(gm, linear) is None:
                return f"float GEMM on int8 weights (output stays float; {self.backend} has no float-output int8 GEMM)", 0
        if grouped:
            groups = len(_groups(module)[0])
            if groups > self.max_sub_gemms:
                return (f"float GEMM on int8 weights (input in {groups} PEG groups: more than "
                        f"{self.max_sub_gemms} sub-GEMMs cost more than they save)"), 0
            return f"{groups} int8 sub-GEMMs (PEG groups), float sum", groups
        if self.backend == "onednn" and (module.spec.qmin, module.spec.qmax, module.spec.signed) == (0, 255, False):
            gelu = _fusable_gelu(linear) is not None
            if _sink_output(gm, next(iter(linear.users)) if gelu else linear, None) is not None:
                return ("int8 GEMM" + (", GELU fused" if gelu else "") + ", requantized uint8 output; first token(s)"
                        " requantized to their own output grid (their rows again, by a batch x n GEMM)"), 0
        if _output_quantizer(gm, linear) is not None:
            return "int8 GEMM, requantized uint8 output", 0
        if self.backend in GELU_ENGINES and _fusable_gelu(linear) is not None:
            if _output_quantizer(gm, next(iter(linear.users))) is not None:
                return "int8 GEMM, GELU fused, requantized uint8 output", 0
            return "int8 GEMM, float output, GELU fused", 0
        return f"int8 GEMM, float output{self._residual_label(linear)}", 0

    def _residual_label(self, linear: torch.fx.Node) -> str:
        fused = self.backend in RESIDUAL_ENGINES and _fusable_residual(linear) is not None
        return ", residual add fused" if fused else ""

    def apply(self, gm: torch.fx.GraphModule, plan: LowerPlan) -> bool:
        _ReferenceLowering(gm, {lin.node for lin in plan.linears if lin.groups}).run()
        if self.backend in AO_ENGINES:
            _AoLowering(gm, self.backend, plan.bf16_attention).run()
        else:
            _split_first_tokens(gm)
        if self.backend == "inductor":
            _separate_float_readers(gm)
            _merge_attention_gemms(gm)
            if plan.bf16_attention:
                use_bf16_attention_in_reference_form(gm)
        remove_dead_code(gm)  # the float weights the int8 copies replaced
        return True


# A Linear whose input has more PEG groups than this runs as a float GEMM on the int8 weights
# (its input still quantized per group). Measured on MiniLM, x86, 2 threads: K=3 sub-GEMMs
# 1.54x and K=6 1.89x the per-tensor int8 model (0.575x FP32); the `best` recipe (K=24 on every
# Linear) runs at 6.3x FP32 as sub-GEMMs and 1.7x with max_sub_gemms=4, but the torch.ao
# engines then keep those weights in float (0.62x of FP32 on disk instead of 0.27x): the
# default keeps int8 sub-GEMMs up to 64 groups, per-channel ranges fall back.
MAX_SUB_GEMMS = 64


def _fake_quantizer(gm: torch.fx.GraphModule, node: torch.fx.Node) -> FakeQuantize | None:
    if node.op != "call_module":
        return None
    module = gm.get_submodule(str(node.target))
    return module if isinstance(module, FakeQuantize) else None


def _output_quantizer(gm: torch.fx.GraphModule, node: torch.fx.Node) -> FakeQuantize | None:
    """The full-range uint8 per-tensor quantizer that is the only reader of ``node``, if any."""
    if len(node.users) != 1:
        return None
    module = _fake_quantizer(gm, next(iter(node.users)))
    if module is None or not module.enabled or not _single_grid(module) or module.has_sink_grid:
        return None
    if module.spec.signed or module.spec.bits != 8:
        return None
    return module


def _no_integer_kernel(module: FakeQuantize, backend: str | None = None) -> str | None:
    """Why this activation quantizer stays simulated in the lowered graph (None: it lowers).
    Without ``backend``: in stage 1, where two grids in one tensor stay simulated; the eager
    engines then make them uint8 codes (:func:`_two_grids_lower`), the reference form splits
    off the first tokens (:func:`_split_first_tokens`)."""
    if module.spec.bits > 8:
        return f"{module.spec.bits}-bit: no integer kernel"
    lowers = _two_grids_lower(module) if backend in AO_ENGINES else \
        backend in REFERENCE_FORMS and _two_grids_split(module)
    if module.has_sink_grid and not lowers:
        return f"first {module.spec.sink_tokens} token(s) on a grid of their own (two grids in one tensor)"
    return None


def _two_grids_split(module: FakeQuantize) -> bool:
    """Whether the reference form lowers a first-token-grid quantizer as two per-tensor
    quantize/dequantize pairs (at most 8 bit, one grid per part)."""
    return module.has_sink_grid and module.spec.bits <= 8 and _single_grid(module)


def _two_grids_lower(module: FakeQuantize) -> bool:
    """Whether a first-token-grid quantizer becomes uint8 codes on the eager engines (unsigned,
    at most 8 bit, one grid per part)."""
    return _two_grids_split(module) and not module.spec.signed


def _sink_linear_lowers(gm: torch.fx.GraphModule, linear: torch.fx.Node, module: FakeQuantize, engine: str) -> bool:
    """Whether a Linear reading a first-token-grid quantizer runs in int8 on ``engine`` (onednn:
    one GEMM and a correction of the first rows; x86/fbgemm: two GEMMs): 8-bit unsigned
    per-tensor main grid, float output on an engine that has one."""
    return _two_grids_lower(module) and has_float_output_kernel(engine) and _output_quantizer(gm, linear) is None


# Siblings are merged while their stacked int8 weights stay under this many elements: on
# SmolLM2 a merged 576 x 3072 gate/up GEMM ran 2.6x slower than its two halves, a merged
# 576 x 960 Q/K/V 0.65x of its three parts (torch.profiler, 2 threads).
MAX_MERGED_WEIGHT = 1 << 20


def _label_merged(gm: torch.fx.GraphModule, linears: list[LoweredLinear], attention_only: bool = False
                  ) -> list[LoweredLinear]:
    """The plan's view of ``_merge_siblings`` (and, ``attention_only``, of
    ``_merge_attention_gemms``): int8 GEMMs with a plain float output that read the same
    quantizer (and only feed fused attention) run as one, while their weights stay under
    ``MAX_MERGED_WEIGHT``."""
    nodes = {n.name: n for n in gm.graph.nodes}
    attention = {n for n in gm.graph.nodes if is_call(n, SDPA)}
    groups: dict[torch.fx.Node, list[int]] = {}
    for i, lin in enumerate(linears):
        plain = lin.kernel.startswith("int8 GEMM, float output") and "residual" not in lin.kernel and not lin.groups
        # the reference form merges only GEMMs with their own weights: none with first-row GEMMs
        if plain and (not attention_only or (lin.kernel == "int8 GEMM, float output"
                                             and read_by_attention_only(nodes[lin.node], attention))):
            groups.setdefault(nodes[lin.node].args[0], []).append(i)
    for members in groups.values():
        size = sum(fetch_attr(gm, str(nodes[linears[i].node].args[1].target)).numel()
                   if nodes[linears[i].node].args[1].op == "get_attr" else 0 for i in members)
        for i in members if len(members) > 1 and size <= MAX_MERGED_WEIGHT else ():
            note = f" (one GEMM with the {len(members) - 1} other Linear(s) reading this input)"
            linears[i] = dataclasses.replace(linears[i], kernel=linears[i].kernel + note)
    return linears


def _mergeable(module: QuantizedLinear) -> bool:
    """An onednn GEMM with a float output and nothing fused after it (see ``_merge_siblings``)."""
    return module.engine == "onednn" and module.out_qparams is None and module.gelu is None and not module.residual


def _sink_output(gm: torch.fx.GraphModule, node: torch.fx.Node, source: FakeQuantize | None) -> torch.fx.Node | None:
    """The first-token-grid quantizer that is the only reader of ``node`` (a Linear, or the
    GELU after it) when onednn can requantize to it: 8-bit unsigned full range, as many first
    tokens as ``source`` (the Linear's input quantizer, if it has a first-token grid), and read
    only by Linears that lower with it as their input. Those then read the two-grid codes as
    they are."""
    if len(node.users) != 1:
        return None
    quantizer = next(iter(node.users))
    module = _fake_quantizer(gm, quantizer)
    if module is None or not module.enabled or not module.has_sink_grid or not _single_grid(module):
        return None
    spec = module.spec
    tokens = spec.sink_tokens if source is None else source.spec.sink_tokens
    if (spec.qmin, spec.qmax, spec.signed, spec.sink_tokens) != (0, 255, False, tokens):
        return None
    readers = list(quantizer.users)
    lowers = all(is_call(r, aten.linear.default) and r.args[0] is quantizer and meta.WEIGHT_QUANT in r.meta
                 and _sink_linear_lowers(gm, r, module, "onednn") for r in readers)
    return quantizer if readers and lowers else None


def _fusable_gelu(linear: torch.fx.Node) -> str | None:
    """The approximation (``"none"``/``"tanh"``) of the GELU that is the only reader of ``linear``."""
    if len(linear.users) != 1:
        return None
    gelu = next(iter(linear.users))
    if not is_call(gelu, aten.gelu.default) or len(gelu.args) != 1:
        return None
    approximate = gelu.kwargs.get("approximate", "none")
    return approximate if approximate in ("none", "tanh") else None


def _fusable_residual(linear: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """``(add, other)`` when ``linear``'s only reader is ``add(linear, other)`` (either order):
    the residual connection after an attention output or FFN projection, which oneDNN adds
    inside the GEMM. Where the recorded shapes show a broadcast or another dtype, no; where
    there are none (stage 2 runs on a copy without them), :class:`QuantizedLinear` checks at
    run time and adds outside the kernel if it must."""
    if len(linear.users) != 1:
        return None
    add = next(iter(linear.users))
    if not is_call(add, aten.add.Tensor) or len(add.args) != 2 or add.kwargs:
        return None
    others = [a for a in add.args if a is not linear]
    if len(others) != 1 or not isinstance(others[0], torch.fx.Node):
        return None
    values = [tensor_val(n) for n in (linear, others[0], add)]
    if all(v is not None for v in values) and not all(
            v.shape == values[0].shape and v.dtype == torch.float32 for v in values):  # type: ignore[union-attr]
        return None
    return add, others[0]


def _main_grid(module: FakeQuantize) -> tuple[float, int]:
    """(scale, zero point) of a single-grid quantizer (per tensor, or PEG groups that share one)."""
    return float(module.scale.flatten()[0]), int(module.zero_point.flatten()[0])


def _sink_grid(module: FakeQuantize) -> tuple[int, float, int]:
    """(first tokens, scale, zero point) of a quantizer's first-token grid."""
    return module.spec.sink_tokens, float(module.sink_scale), int(module.sink_zero_point)


def _single_grid(module: FakeQuantize) -> bool:
    """Whether every channel uses the same scale and zero point (per tensor, or PEG with K=1):
    then it lowers as a per-tensor quantizer, with int8 kernels end to end."""
    if module.spec.granularity is Granularity.PER_TENSOR:
        return True
    return bool((module.scale == module.scale.flatten()[0]).all() and
                (module.zero_point == module.zero_point.flatten()[0]).all())


def _groups(module: FakeQuantize) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The channel groups of a grouped quantizer (channels sharing scale and zero point, in
    channel order), with each group's scale and zero point."""
    pairs = torch.stack([module.scale.double(), module.zero_point.double()], 1)
    unique, inverse = torch.unique(pairs, dim=0, return_inverse=True)
    groups = [torch.nonzero(inverse == g).flatten() for g in range(unique.shape[0])]
    return groups, unique[:, 0].float(), unique[:, 1].to(torch.int64)


class _ReferenceLowering:
    """Stage 1: FakeQuantize -> quantized_decomposed q/dq; int8 weights and embedding tables."""

    def __init__(self, gm: torch.fx.GraphModule, split: set[str]) -> None:
        self.gm, self.graph, self.split = gm, gm.graph, split  # names of the Linears to split per PEG group
        self.weights: dict[tuple, tuple[str, str, str, QuantSpec]] = {}  # (memory, shape, spec) -> int8, scale, zp

    def run(self) -> None:
        grouped_inputs: dict[torch.fx.Node, FakeQuantize] = {}
        for node in list(self.graph.nodes):
            module = _fake_quantizer(self.gm, node)
            if module is not None:
                dq = self._activation(node, module)
                if dq is not None and not _single_grid(module):
                    grouped_inputs[dq] = module
        for node in list(self.graph.nodes):
            if op_kind(node) is OpKind.LINEAR and meta.WEIGHT_QUANT in node.meta:
                source = node.args[0]
                if node.name in self.split and source in grouped_inputs:
                    self._split_linear(node, grouped_inputs[source])
                else:
                    node.update_arg(1, self._weight(node, node.args[1], node.meta[meta.WEIGHT_QUANT]))
            elif op_kind(node) is OpKind.EMBEDDING and meta.WEIGHT_QUANT in node.meta:
                self._embedding(node)
        self.graph.eliminate_dead_code()

    def _buffer(self, base: str, value: torch.Tensor) -> torch.fx.Node:
        name = unique_attr_name(self.gm, base)
        set_attr(self.gm, name, value)
        return self.graph.get_attr(name)

    def _activation(self, node: torch.fx.Node, module: FakeQuantize) -> torch.fx.Node | None:
        x = node.args[0]
        if not module.enabled:
            node.replace_all_uses_with(x)
            self.graph.erase_node(node)
            return None
        spec = module.spec
        if _no_integer_kernel(module) is not None:
            return None
        dtype = integer_dtype(spec)
        with self.graph.inserting_before(node):
            if _single_grid(module):  # per tensor, or groups that share one grid (K=1)
                qparams = (*_main_grid(module), spec.qmin, spec.qmax, dtype)
                q = self.graph.call_function(Q_TENSOR, (x, *qparams))
                dq = self.graph.call_function(DQ_TENSOR, (q, *qparams))
            else:
                axis = spec.axis % tensor_val(x).dim()
                scale = self._buffer(f"{node.target}_scale", module.scale.float())
                zero_point = self._buffer(f"{node.target}_zero_point", module.zero_point.to(torch.int64))
                qparams = (scale, zero_point, axis, spec.qmin, spec.qmax, dtype)
                q = self.graph.call_function(Q_CHANNEL, (x, *qparams))
                q.meta[_NDIM] = tensor_val(x).dim()
                dq = self.graph.call_function(DQ_CHANNEL, (q, *qparams))
        for new in (q, dq):
            meta.inherit(new, node, "Lower")
        node.replace_all_uses_with(dq)
        self.graph.erase_node(node)
        del_attr(self.gm, str(node.target))
        return dq

    def _integer_weight(self, target: str, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 codes and per-row scales of a weight ConvertToFakeQuant put on the grid.

        Re-quantizing an on-grid tensor recovers its codes exactly (the scale to the last ulp)."""
        if spec.granularity is not Granularity.PER_CHANNEL or spec.axis % 2 != 0 or not spec.symmetric \
                or spec.bits > 8:
            raise PassError(f"{target}: lowering needs symmetric per-row weights of <= 8 bits, got {spec.describe()}")
        weight = fetch_attr(self.gm, target).detach()
        # an on-grid row's extreme is its qmax code (a clipped row too): min-max recovers the scale
        _, scale, zero_point = quantize_weight(weight, spec.with_(estimator=Estimator.MINMAX))
        codes = quantize_to_integers(weight, scale, zero_point, spec)
        if not torch.allclose(codes.float() * scale[:, None], weight, rtol=1e-5, atol=0.0):
            raise PassError(f"{target} is not on an int{spec.bits} grid; was the graph converted by ConvertToFakeQuant?")
        return codes, scale.float()

    def _weight_attrs(self, weight: torch.fx.Node, spec: QuantSpec) -> tuple[str, str, str, QuantSpec]:
        target = str(weight.target)
        # keyed by the tensor: a tied table (lm_head = embedding) may sit under two names
        tensor = fetch_attr(self.gm, target)
        key = (tensor.data_ptr(), tuple(tensor.shape), spec)
        if key not in self.weights:
            codes, scale = self._integer_weight(target, spec)
            names = []
            for suffix, value in (("_int8", codes), ("_scale", scale), ("_zero_point", torch.zeros_like(scale, dtype=torch.int64))):
                name = unique_attr_name(self.gm, target + suffix)
                set_attr(self.gm, name, value)
                names.append(name)
            self.weights[key] = (*names, spec)
        return self.weights[key]

    def _dequantized_weight(self, attrs: tuple[str, str, str, QuantSpec], codes: str | None = None) -> torch.fx.Node:
        int8, scale, zero_point, spec = attrs
        args = (self.graph.get_attr(codes or int8), self.graph.get_attr(scale), self.graph.get_attr(zero_point),
                0, spec.qmin, spec.qmax, torch.int8)
        return self.graph.call_function(DQ_CHANNEL, args)

    def _weight(self, linear: torch.fx.Node, weight: torch.fx.Node, spec: QuantSpec) -> torch.fx.Node:
        attrs = self._weight_attrs(weight, spec)
        with self.graph.inserting_before(linear):
            return self._dequantized_weight(attrs)

    def _split_linear(self, linear: torch.fx.Node, module: FakeQuantize) -> None:
        """``x @ W^T`` with x quantized per channel group -> sum over groups of ``x_g @ W_g^T``,
        each ``x_g`` quantized per tensor with its group's parameters."""
        spec: QuantSpec = linear.meta[meta.WEIGHT_QUANT]
        dq = linear.args[0]
        x = dq.args[0].args[0]  # the float tensor before the grouped quantize
        bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
        groups, scales, zero_points = _groups(module)
        attrs = self._weight_attrs(linear.args[1], spec)
        codes = fetch_attr(self.gm, attrs[0])
        order = torch.cat(groups)
        act = module.spec
        before = set(self.graph.nodes)
        with self.graph.inserting_before(linear):
            gathered = self.graph.call_function(aten.index_select.default,
                                                (x, -1, self._buffer(f"{linear.name}_channel_order", order)))
            total, start = None, 0
            for g, channels in enumerate(groups):
                end = start + channels.numel()
                part = self.graph.call_function(aten.slice.Tensor, (gathered, -1, start, end))
                qparams = (float(scales[g]), int(zero_points[g]), act.qmin, act.qmax, integer_dtype(act))
                q = self.graph.call_function(Q_TENSOR, (part, *qparams))
                xg = self.graph.call_function(DQ_TENSOR, (q, *qparams))
                columns = unique_attr_name(self.gm, f"{attrs[0]}_group{g}")
                set_attr(self.gm, columns, codes[:, channels].contiguous())
                wg = self._dequantized_weight(attrs, columns)
                out = self.graph.call_function(aten.linear.default, (xg, wg, bias if g == 0 else None))
                out.meta[meta.WEIGHT_QUANT] = spec
                total = out if total is None else self.graph.call_function(aten.add.Tensor, (total, out))
                start = end
        for new in self.graph.nodes:
            if new not in before:
                meta.inherit(new, linear, "Lower")  # the sub-GEMMs read as the Linear they replace
        linear.replace_all_uses_with(total)
        self.graph.erase_node(linear)

    def _embedding(self, node: torch.fx.Node) -> None:
        spec: QuantSpec = node.meta[meta.WEIGHT_QUANT]
        weight, indices = node.args[0], node.args[1]
        int8, scale, _, _ = self._weight_attrs(weight, spec)
        with self.graph.inserting_before(node):
            codes = self.graph.call_function(aten.embedding.default, (self.graph.get_attr(int8), indices))
            rows = self.graph.call_function(aten._to_copy.default, (codes,), {"dtype": torch.float32})
            scale_rows = unique_attr_name(self.gm, scale + "_rows")
            set_attr(self.gm, scale_rows, fetch_attr(self.gm, scale)[:, None].contiguous())
            row_scale = self.graph.call_function(aten.embedding.default, (self.graph.get_attr(scale_rows), indices))
            value = self.graph.call_function(aten.mul.Tensor, (rows, row_scale))
        for new in (codes, rows, row_scale, value):
            meta.inherit(new, node, "Lower")
        node.replace_all_uses_with(value)
        self.graph.erase_node(node)


class _AoLowering:
    """Stage 2: quantized values flow as ``quint8`` tensors between the ops torch.ao engines
    run in int8 (Linear, add, layer_norm), with the requantization to the next quantizer's
    grid fused into each kernel; float ops read a dequantized copy, made once per value."""

    def __init__(self, gm: torch.fx.GraphModule, engine: str, bf16_attention: bool = False) -> None:
        self.gm, self.graph, self.engine, self.bf16_attention = gm, gm.graph, engine, bf16_attention
        self.quantized: dict[torch.fx.Node, torch.fx.Node] = {}  # q node -> node giving its quint8 tensor
        self.two_grid: dict[torch.fx.Node, torch.fx.Node] = {}  # first-token-grid quantizer -> its uint8 codes
        # per-row weight scales in the float64 the engines take, one tensor per source: the K
        # sub-GEMMs of a PEG-split Linear share their rows' scales (and one copy on disk)
        self.row_scales: dict[int, torch.Tensor] = {}

    def run(self) -> None:
        for node in list(self.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target is aten.linear.default:
                self._linear(node)
            elif node.target in (aten.add.Tensor, aten.layer_norm.default):
                self._elementwise(node)
        for node in list(self.graph.nodes):  # after the Linears: what still reads a two-grid quantizer
            self._two_grid_values(node)
        for node in list(self.graph.nodes):
            if node.op == "call_function" and node.target in (DQ_TENSOR, DQ_CHANNEL) and node.args[0].op != "get_attr":
                self._float_view(node)
        for node in list(self.graph.nodes):  # weights of float fallbacks: dequantized once, now
            if node.op == "call_function" and node.target is DQ_CHANNEL and node.args[0].op == "get_attr":
                self._constant_weight(node)
        self.graph.eliminate_dead_code()
        if self.engine == "onednn":
            self._merge_siblings()
        for node in list(self.graph.nodes):
            self._scale_in_place(node)
            self._plain_codes(node)
        self._skip_zero_masks()
        if self.bf16_attention:
            use_bf16_attention(self.gm)

    def _skip_zero_masks(self) -> None:
        """Fused attention reads its additive mask through :func:`mask_or_none`, once per mask."""
        checked: dict[torch.fx.Node, torch.fx.Node] = {}
        for node in list(self.graph.nodes):
            mask = node.kwargs.get("attn_mask") if is_call(node, SDPA) else None
            if not isinstance(mask, torch.fx.Node):
                continue
            if mask not in checked:
                with self.graph.inserting_after(mask):
                    checked[mask] = self.graph.call_function(mask_or_none, (mask,))
            node.update_kwarg("attn_mask", checked[mask])

    def _merge_siblings(self) -> None:
        """Float-output GEMMs with nothing fused that read the same int8 value (Q, K and V; a
        gate and up projection) become one GEMM over their stacked weights, its output split
        (views) among their readers: one call and, with first-token grids, one correction
        instead of several."""
        groups: dict[tuple, list[torch.fx.Node]] = {}
        for node in self.graph.nodes:
            module = self.gm.get_submodule(str(node.target)) if node.op == "call_module" else None
            if isinstance(module, QuantizedLinear) and _mergeable(module) and len(node.args) == 1:
                key = (node.args[0], module.in_scale, module.in_zero_point, module.in_qmin, module.in_qmax, module.sink)
                groups.setdefault(key, []).append(node)
        for nodes in groups.values():
            modules = [self.gm.get_submodule(str(n.target)) for n in nodes]
            if len(nodes) < 2 or sum(m.weight_int8.numel() for m in modules) > MAX_MERGED_WEIGHT:
                continue
            first = modules[0]
            biases = [m.bias if m.bias is not None else torch.zeros(m.out_features) for m in modules]
            merged = QuantizedLinear(torch.cat([m.weight_int8 for m in modules]), torch.cat([m.weight_scale for m in modules]),
                                     torch.cat(biases), (first.in_scale, first.in_zero_point, first.in_qmin, first.in_qmax),
                                     None, self.engine, sink=first.sink)
            name = unique_attr_name(self.gm, LINEAR_MODULE_PREFIX + "merged_" + nodes[0].name)
            self.gm.add_module(name, merged)
            with self.graph.inserting_before(nodes[0]):
                call = self.graph.call_module(name, nodes[0].args)
                split = self.graph.call_function(torch.split, (call, [m.out_features for m in modules], -1))
                parts = [self.graph.call_function(operator.getitem, (split, i)) for i in range(len(nodes))]
            meta.inherit(call, nodes[0], "Lower")
            for node, part in zip(nodes, parts):
                meta.inherit(part, node, "Lower")
                node.replace_all_uses_with(part)
                target = str(node.target)
                self.graph.erase_node(node)
                self.gm.delete_submodule(target)

    def _plain_codes(self, node: torch.fx.Node) -> None:
        """An onednn GEMM whose requantized output only onednn GEMMs read hands them the uint8
        codes as they are (no quint8 wrapper, which copies them: 0.1 ms per MiniLM FFN)."""
        module = self.gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if not (isinstance(module, QuantizedLinear) and module.engine == "onednn" and module.out_qparams):
            return
        readers = [self.gm.get_submodule(str(u.target)) if u.op == "call_module" else None for u in node.users]
        if node.users and all(isinstance(r, QuantizedLinear) and r.engine == "onednn" and u.args[0] is node
                              and node not in u.args[1:] for r, u in zip(readers, node.users)):
            module.codes_out = True

    def _scale_in_place(self, node: torch.fx.Node) -> None:
        """``x * s`` with ``s`` a stored per-channel vector (a Quadapter scale the graph keeps,
        or its post-LN compensation) and ``x`` a fresh temporary nobody else reads (an int8
        GEMM's float output, a dequantized copy) becomes ``x.mul_(s)``: no new activation-sized
        tensor (on MiniLM ``smooth``, 0.345x -> 0.313x of FP32 latency, measured)."""
        if not is_call(node, aten.mul.Tensor) or len(node.args) != 2 or node.kwargs:
            return
        x, s = node.args
        if not (isinstance(x, torch.fx.Node) and isinstance(s, torch.fx.Node) and s.op == "get_attr"):
            return
        scale = fetch_attr(self.gm, str(s.target))
        channels = self._fresh_float_channels(x) if len(x.users) == 1 else None
        if channels is None and is_call(x, aten.layer_norm.default) and self._read_before(x, node):
            channels = int(x.args[1][-1])  # a post-LN shortcut's compensation, after the quantize read x
        if channels is None or scale.dtype != torch.float32 or tuple(scale.shape) != (channels,):
            return
        node.target = aten.mul_.Tensor

    def _read_before(self, x: torch.fx.Node, node: torch.fx.Node) -> bool:
        """Every other reader of ``x`` runs before ``node`` and makes a new tensor of it (codes,
        an int8 GEMM's output): scaling ``x`` in place at ``node`` changes nothing they see."""
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        others = [u for u in x.users if u is not node]
        return all(order[u] < order[node] and (
            u.target in (torch.quantize_per_tensor, two_grid_codes, Q_TENSOR)
            or (u.op == "call_module" and isinstance(self.gm.get_submodule(str(u.target)), QuantizedLinear)))
            for u in others)

    def _fresh_float_channels(self, node: torch.fx.Node) -> int | None:
        """The last-axis size of ``node``'s value if it is a new float32 tensor (an int8 GEMM's
        float output, or codes dequantized), else None."""
        if node.op == "call_module":
            module = self.gm.get_submodule(str(node.target))
            float_out = isinstance(module, QuantizedLinear) and module.out_qparams is None
            return module.out_features if float_out else None
        dequantized = (node.op == "call_function" and node.target is two_grid_dequantize) or (
            node.op == "call_method" and node.target == "dequantize")
        return self._code_channels(node.args[0]) if dequantized and isinstance(node.args[0], torch.fx.Node) else None

    def _code_channels(self, source: torch.fx.Node) -> int | None:
        """The last-axis size of int8 codes: the GEMM that produced them, or the float value
        they were quantized from (when its shape is recorded)."""
        if source.op == "call_module":
            module = self.gm.get_submodule(str(source.target))
            return module.out_features if isinstance(module, QuantizedLinear) else None
        if source.target in (torch.quantize_per_tensor, two_grid_codes):
            value = tensor_val(source.args[0])
            return int(value.shape[-1]) if value is not None and value.dim() > 0 else None
        return None

    # -- int8 values ---------------------------------------------------------------------------
    @staticmethod
    def _uint8_value(node: object) -> torch.fx.Node | None:
        """The full-range uint8 per-tensor quantize node behind a dequantize node."""
        if is_call(node, DQ_TENSOR) and is_call(node.args[0], Q_TENSOR) \
                and tuple(node.args[0].args[3:6]) == (0, 255, torch.uint8):
            return node.args[0]
        return None

    @staticmethod
    def _output_value(node: torch.fx.Node) -> torch.fx.Node | None:
        """The full-range uint8 quantize node that is the only reader of ``node``."""
        if len(node.users) != 1:
            return None
        q = next(iter(node.users))
        return q if is_call(q, Q_TENSOR) and tuple(q.args[3:6]) == (0, 255, torch.uint8) else None

    def _quint8(self, q: torch.fx.Node) -> torch.fx.Node:
        """The quint8 tensor of value ``q``: the int8 op that produced it, or one quantize."""
        if q not in self.quantized:
            with self.graph.inserting_after(q):
                node = self.graph.call_function(torch.quantize_per_tensor, (q.args[0], q.args[1], q.args[2], torch.quint8))
            meta.inherit(node, q, "Lower")
            self.quantized[q] = node
        return self.quantized[q]

    def _linear(self, linear: torch.fx.Node) -> None:
        x_dq, w_dq = linear.args[0], linear.args[1]
        bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
        sink = _fake_quantizer(self.gm, x_dq) if isinstance(x_dq, torch.fx.Node) else None
        if sink is not None and sink.enabled and _sink_linear_lowers(self.gm, linear, sink, self.engine) \
                and self._output_value(linear) is None and is_call(w_dq, DQ_CHANNEL) and w_dq.args[0].op == "get_attr":
            self._sink_linear(linear, sink, w_dq, bias)
            return
        if not (is_call(x_dq, DQ_TENSOR) and is_call(x_dq.args[0], Q_TENSOR) and is_call(w_dq, DQ_CHANNEL)):
            return
        q_x = x_dq.args[0]
        scale, zero_point, qmin, qmax, dtype = q_x.args[1:6]
        if dtype != torch.uint8 or w_dq.args[0].op != "get_attr":
            return
        q_out = self._output_value(linear)
        gelu = _fusable_gelu(linear) if q_out is None and self.engine in GELU_ENGINES else None
        if gelu is not None:  # Linear -> GELU -> quantize: GELU and requantization both in the GEMM
            q_out = self._output_value(next(iter(linear.users)))
        sink_node = self._sink_output(linear, gelu) if q_out is None else None
        if sink_node is not None:  # requantized to a first-token-grid output (MiniLM's GELU outputs)
            target = self.gm.get_submodule(str(sink_node.target))
            self.two_grid[sink_node] = self._replace_linear(
                linear, w_dq, bias, (scale, zero_point, qmin, qmax), _main_grid(target), gelu, self._quint8(q_x),
                sink_out=_sink_grid(target))
            return
        if q_out is None and not has_float_output_kernel(self.engine):
            return  # float fallback (listed in the plan)
        out = None if q_out is None else (q_out.args[1], q_out.args[2])
        residual = self._residual(linear) if out is None and gelu is None else None
        full_range = self._uint8_value(x_dq) is not None
        if full_range and (out is not None or self.engine == "onednn"):
            # int8 in; onednn: quantized once for every Linear that reads the value (Q, K, V)
            source = self._quint8(q_x)
        else:
            source = q_x.args[0]  # the float input, quantized inside the kernel
        call = self._replace_linear(linear, w_dq, bias, (scale, zero_point, qmin, qmax), out, gelu, source,
                                    residual=residual)
        if q_out is not None:
            self.quantized[q_out] = call

    def _sink_output(self, linear: torch.fx.Node, gelu: str | None) -> torch.fx.Node | None:
        """The first-token-grid quantizer that a single-grid onednn GEMM can requantize to."""
        if self.engine != "onednn" or self._uint8_value(linear.args[0]) is None:
            return None
        return _sink_output(self.gm, next(iter(linear.users)) if gelu is not None else linear, None)

    def _sink_linear(self, linear: torch.fx.Node, module: FakeQuantize, w_dq: torch.fx.Node, bias: object) -> None:
        """A Linear whose input quantizer gives the first tokens their own grid. x86/fbgemm: two
        GEMMs on the float input. onednn: one GEMM on two-grid uint8 codes (made once for every
        Linear that reads the value) and a small one for the first tokens' rows; a following
        GELU, the residual add, and the requantization to a first-token-grid output that only
        such Linears read go into both."""
        qparams = (*_main_grid(module), module.spec.qmin, module.spec.qmax)
        sink = _sink_grid(module)
        quantizer = linear.args[0]
        if self.engine != "onednn":
            self._replace_linear(linear, w_dq, bias, qparams, None, None, quantizer.args[0], sink, self._residual(linear))
            return
        gelu = _fusable_gelu(linear)
        out_node = _sink_output(self.gm, next(iter(linear.users)) if gelu is not None else linear, module)
        out = sink_out = None
        if out_node is not None:
            target = self.gm.get_submodule(str(out_node.target))
            out, sink_out = _main_grid(target), _sink_grid(target)
        residual = self._residual(linear) if gelu is None and out is None else None
        call = self._replace_linear(linear, w_dq, bias, qparams, out, gelu, self._two_grid_codes(quantizer, qparams, sink),
                                    sink, residual, sink_out)
        if out_node is not None:
            self.two_grid[out_node] = call

    def _two_grid_values(self, node: torch.fx.Node) -> None:
        """A first-token-grid quantizer that ops other than int8 GEMMs still read (a post-LN
        residual add): they read its codes dequantized, made once (or taken from the GEMM that
        produced them)."""
        module = _fake_quantizer(self.gm, node)
        if module is None or not module.enabled or not node.users or not _two_grids_lower(module):
            return
        (scale, zero_point), sink = _main_grid(module), _sink_grid(module)
        codes = self._two_grid_codes(node, (scale, zero_point, module.spec.qmin, module.spec.qmax), sink)
        with self.graph.inserting_after(codes):
            values = self.graph.call_function(two_grid_dequantize, (codes, sink[0], scale, zero_point, *sink[1:]))
        meta.inherit(values, node, "Lower")
        node.replace_all_uses_with(values)

    def _two_grid_codes(self, quantizer: torch.fx.Node, qparams: tuple, sink: tuple[int, float, int]) -> torch.fx.Node:
        """The uint8 codes of a first-token-grid quantizer's value: the int8 GEMM that produced
        them, or one :func:`two_grid_codes` call shared by its readers."""
        if quantizer not in self.two_grid:
            scale, zero_point, qmin, qmax = qparams
            with self.graph.inserting_after(quantizer):
                node = self.graph.call_function(two_grid_codes, (quantizer.args[0], sink[0], scale, zero_point,
                                                                 sink[1], sink[2], qmin, qmax))
            meta.inherit(node, quantizer, "Lower")
            self.two_grid[quantizer] = node
        return self.two_grid[quantizer]

    def _residual(self, linear: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
        return _fusable_residual(linear) if self.engine in RESIDUAL_ENGINES else None

    def _replace_linear(self, linear: torch.fx.Node, w_dq: torch.fx.Node, bias: object,
                        in_qparams: tuple, out: tuple | None, gelu: str | None, source: torch.fx.Node,
                        sink: tuple[int, float, int] | None = None,
                        residual: tuple[torch.fx.Node, torch.fx.Node] | None = None,
                        sink_out: tuple[int, float, int] | None = None) -> torch.fx.Node:
        """Put a :class:`QuantizedLinear` reading ``source`` in place of ``linear`` (and of the
        GELU, or the residual ``(add, other)``, fused into it)."""
        codes = fetch_attr(self.gm, str(w_dq.args[0].target))
        w_scale = fetch_attr(self.gm, str(w_dq.args[1].target))
        w_scale = self.row_scales.setdefault(w_scale.data_ptr(), w_scale.detach().double())
        bias_value = fetch_attr(self.gm, str(bias.target)) if isinstance(bias, torch.fx.Node) else None
        module = QuantizedLinear(codes, w_scale, bias_value, in_qparams, out, self.engine, gelu, sink,
                                 residual=residual is not None, sink_out=sink_out)
        name = unique_attr_name(self.gm, LINEAR_MODULE_PREFIX + linear.name)
        self.gm.add_module(name, module)
        # after ``other`` too: the add's position (``linear`` precedes it)
        with self.graph.inserting_before(linear if residual is None else residual[0]):
            call = self.graph.call_module(name, (source,) if residual is None else (source, residual[1]))
        meta.inherit(call, linear, "Lower")
        if residual is not None:
            residual[0].replace_all_uses_with(call)
            self.graph.erase_node(residual[0])
        if out is None:  # with a requantized output the quantize node stands for the value and goes later
            if gelu is not None:
                fused = next(iter(linear.users))
                fused.replace_all_uses_with(call)
                self.graph.erase_node(fused)
            linear.replace_all_uses_with(call)
        return call

    def _elementwise(self, node: torch.fx.Node) -> None:
        """add / layer_norm with int8 inputs and an int8 output -> torch.ao's quantized kernel."""
        q_out = self._output_value(node)
        if q_out is None:
            return
        if node.target is aten.add.Tensor:
            if len(node.args) != 2 or node.kwargs:
                return
            inputs = [self._uint8_value(a) for a in node.args]
            if any(q is None for q in inputs):
                return
            args = (*(self._quint8(q) for q in inputs), q_out.args[1], q_out.args[2])
            target = torch.ops.quantized.add.default
        else:
            q_in = self._uint8_value(node.args[0])
            if q_in is None:
                return
            args = list(node.args) + [None] * (5 - len(node.args))
            shape, weight, bias = args[1], args[2], args[3]
            eps = args[4] if args[4] is not None else node.kwargs.get("eps", 1e-5)
            args = (self._quint8(q_in), shape, weight, bias, eps, q_out.args[1], q_out.args[2])
            target = torch.ops.quantized.layer_norm.default
        with self.graph.inserting_before(node):
            call = self.graph.call_function(target, args)
        meta.inherit(call, node, "Lower")
        self.quantized[q_out] = call

    # -- float views -------------------------------------------------------------------------
    def _float_view(self, dq: torch.fx.Node) -> None:
        """A dequantize read by float ops: dequantize the int8 tensor if there is one, else
        quantize and dequantize the float value with torch's quantized-tensor kernels (~10x
        faster than its fused fake-quantize kernel on attention-sized tensors)."""
        q = dq.args[0]
        if not dq.users:
            return
        with self.graph.inserting_before(dq):
            if q in self.quantized:
                new = self.graph.call_method("dequantize", (self.quantized[q],))
            else:
                new = self._quantize_dequantize(q)
        meta.inherit(new, dq, "Lower")
        dq.replace_all_uses_with(new)

    def _quantize_dequantize(self, q: torch.fx.Node) -> torch.fx.Node:
        per_tensor = q.target is Q_TENSOR
        x, *params = q.args
        qmin, qmax, dtype = params[-3:]
        full = (-128, 127) if dtype == torch.int8 else (0, 255)
        if (qmin, qmax) != full:  # a narrower grid (A6, A4): clamp at its ends first
            if not per_tensor:
                raise PassError("per-channel activation grids narrower than 8 bit have no integer kernel")
            scale, zero_point = params[0], params[1]
            x = self.graph.call_function(torch.clamp, (x, (qmin - zero_point) * scale, (qmax - zero_point) * scale))
        if not per_tensor:  # elementwise, as fake_quantize computes it: ~20x faster than quantize_per_channel
            return self._channel_fake_quantize(x, q.meta[_NDIM], *params)
        qdtype = torch.qint8 if dtype == torch.int8 else torch.quint8
        quantized = self.graph.call_function(torch.quantize_per_tensor, (x, params[0], params[1], qdtype))
        return self.graph.call_method("dequantize", (quantized,))

    def _channel_fake_quantize(self, x: torch.fx.Node, ndim: int, scale: torch.fx.Node, zero_point: torch.fx.Node,
                               axis: int, qmin: int, qmax: int, dtype: torch.dtype) -> torch.fx.Node:
        scale_value = fetch_attr(self.gm, str(scale.target)).float()
        shape = [-1] + [1] * (ndim - 1 - axis)  # broadcast along ``axis``
        constants = {}
        for name, value in (("inverse_scale", 1.0 / scale_value), ("zero_point_float",
                            fetch_attr(self.gm, str(zero_point.target)).float()), ("scale_float", scale_value)):
            constants[name] = self.graph.get_attr(_constant(self.gm, f"{scale.target}_{name}", value.reshape(shape)))
        call = self.graph.call_function
        codes = call(aten.clamp.default, (call(aten.add.Tensor, (call(aten.round.default, (
            call(aten.mul.Tensor, (x, constants["inverse_scale"])),)), constants["zero_point_float"])), qmin, qmax))
        return call(aten.mul.Tensor, (call(aten.sub.Tensor, (codes, constants["zero_point_float"])),
                                      constants["scale_float"]))

    def _constant_weight(self, dq: torch.fx.Node) -> None:
        codes, scale = (fetch_attr(self.gm, str(a.target)) for a in dq.args[:2])
        name = unique_attr_name(self.gm, str(dq.args[0].target) + "_dequantized")
        set_attr(self.gm, name, codes.float() * scale[:, None])
        with self.graph.inserting_before(dq):
            new = self.graph.get_attr(name)
        dq.replace_all_uses_with(new)


def _split_first_tokens(gm: torch.fx.GraphModule) -> None:
    """Reference form of the first-token-grid quantizers that stage 1 left simulated: the whole
    tensor on the main grid and its first positions again on theirs, carried through the
    row-wise ops that follow as a pair (:func:`~outlierfx.passes.first_rows.follow_first_rows`),
    so that the main graph keeps inductor's int8 patterns. Exact for inputs longer than the
    first positions; an input of exactly that many positions takes the first-token grid, where
    the fake-quant model keeps the main one."""
    graph = gm.graph
    pairs: dict[torch.fx.Node, tuple[torch.fx.Node, int]] = {}
    for node in list(graph.nodes):
        module = _fake_quantizer(gm, node)
        if module is None or not _two_grids_split(module):
            continue
        x, spec = node.args[0], module.spec
        main = (*_main_grid(module), spec.qmin, spec.qmax, integer_dtype(spec))
        with graph.inserting_before(node):
            q = graph.call_function(Q_TENSOR, (x, *main))
            dq = graph.call_function(DQ_TENSOR, (q, *main))
            created = [q, dq]
            value = tensor_val(x)
            if value is None or value.dim() >= 3:  # FakeQuantize has no first-token grid below rank 3
                n, sink_scale, sink_zero_point = _sink_grid(module)
                first_spec = spec.sink_spec()
                first = (sink_scale, sink_zero_point, first_spec.qmin, first_spec.qmax, integer_dtype(first_spec))
                head = first_rows_of_value(graph, x, n)
                q_head = graph.call_function(Q_TENSOR, (head, *first))
                dq_head = graph.call_function(DQ_TENSOR, (q_head, *first))
                created += [head, q_head, dq_head]
                q.meta[FIRST_ROWS_UNREAD] = True
                pairs[dq] = (dq_head, n)
        for new in created:
            meta.inherit(new, node, "Lower")
        if "val" in node.meta:
            dq.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(dq)
        graph.erase_node(node)
        del_attr(gm, str(node.target))
    follow_first_rows(gm, pairs)


def _separate_float_readers(gm: torch.fx.GraphModule) -> None:
    """Give the non-Linear readers of a quantized value their own quantize/dequantize pair.

    Inductor's int8 GEMM patterns take a ``dequantize`` shared by several Linears (Q, K, V)
    only if every reader is a Linear; a post-LN norm output is also read by the residual add.
    The second pair uses the ``.tensor`` overloads so that common-subexpression elimination
    does not merge it back. Values are unchanged; inductor fuses the extra quantize."""
    for dq in list(gm.graph.nodes):
        if not is_call(dq, DQ_TENSOR) or not is_call(dq.args[0], Q_TENSOR):
            continue
        readers = list(dq.users)
        others = [u for u in readers if not is_call(u, aten.linear.default)]
        if not others or len(others) == len(readers):
            continue
        q = dq.args[0]
        x, scale, zero_point, *rest = q.args
        with gm.graph.inserting_before(dq.next):  # in order, right after dq
            scale_node = gm.graph.get_attr(_constant(gm, f"{q.name}_scale", torch.tensor(scale, dtype=torch.float64)))
            zp_node = gm.graph.get_attr(_constant(gm, f"{q.name}_zero_point", torch.tensor(zero_point)))
            q2 = gm.graph.call_function(qd.quantize_per_tensor.tensor, (x, scale_node, zp_node, *rest))
            dq2 = gm.graph.call_function(qd.dequantize_per_tensor.tensor, (q2, scale_node, zp_node, *rest))
        for new in (q2, dq2):
            meta.inherit(new, dq, "Lower")
        for user in others:
            user.replace_input_with(dq, dq2)


def _merge_attention_gemms(gm: torch.fx.GraphModule) -> None:
    """The reference form of ``_merge_siblings``: int8 GEMMs that read the same quantized value
    and whose outputs reach nothing but fused attention, through views (Q, K and V), become one
    GEMM over their stacked int8 weights, split by views. Inductor fuses nothing after such a
    GEMM, so one call replaces three. Weights another GEMM also reads (first-row GEMMs) stay."""
    attention = {n for n in gm.graph.nodes if is_call(n, SDPA)}
    groups: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if is_call(node, aten.linear.default) and is_call(node.args[0], DQ_TENSOR) and _own_int8_weight(node) \
                and read_by_attention_only(node, attention):
            groups.setdefault(node.args[0], []).append(node)
    for nodes in groups.values():
        weights = [[fetch_attr(gm, str(a.target)) for a in n.args[1].args[:3]] for n in nodes]
        biases = [n.args[2] if len(n.args) > 2 else None for n in nodes]
        rows = [w[0].shape[0] for w in weights]
        if len(nodes) < 2 or sum(w[0].numel() for w in weights) > MAX_MERGED_WEIGHT \
                or any(b is not None and b.op != "get_attr" for b in biases) \
                or len({tuple(n.args[1].args[3:]) for n in nodes}) != 1:
            continue
        stacked = [torch.cat([w[i] for w in weights]) for i in range(3)]
        bias = torch.cat([fetch_attr(gm, str(b.target)) if b is not None else torch.zeros(r)
                          for b, r in zip(biases, rows)])
        first = nodes[0]
        with gm.graph.inserting_before(first):
            names = [_constant(gm, f"{first.name}_merged_{part}", t)
                     for part, t in zip(("weight_int8", "weight_scale", "weight_zero_point", "bias"), (*stacked, bias))]
            codes, scale, zero_point, b = (gm.graph.get_attr(name) for name in names)
            w = gm.graph.call_function(DQ_CHANNEL, (codes, scale, zero_point, *first.args[1].args[3:]))
            merged = gm.graph.call_function(aten.linear.default, (first.args[0], w, b))
            parts = gm.graph.call_function(aten.split_with_sizes.default, (merged, rows, -1))
        meta.inherit(merged, first, "Lower")
        merged.meta[meta.WEIGHT_QUANT] = first.meta[meta.WEIGHT_QUANT]
        for i, node in enumerate(nodes):
            with gm.graph.inserting_before(node):
                part = gm.graph.call_function(operator.getitem, (parts, i))
            meta.inherit(part, node, "Lower")
            node.replace_all_uses_with(part)
            gm.graph.erase_node(node)


def _own_int8_weight(linear: torch.fx.Node) -> bool:
    """Whether ``linear`` reads int8 weight codes, scales and zero points that no other node reads."""
    w = linear.args[1]
    return is_call(w, DQ_CHANNEL) and len(w.users) == 1 \
        and all(isinstance(a, torch.fx.Node) and a.op == "get_attr" and len(a.users) == 1 for a in w.args[:3])


def _constant(gm: torch.fx.GraphModule, base: str, value: torch.Tensor) -> str:
    name = unique_attr_name(gm, base)
    set_attr(gm, name, value)
    return name
