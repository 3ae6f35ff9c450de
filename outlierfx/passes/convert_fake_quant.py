"""ConvertToFakeQuant: calibrated observers become quantize-dequantize modules, and Linear
weights and embedding tables are replaced by their quantized values (per the policy's weight
and embedding specs). Each such node records its spec under ``meta.WEIGHT_QUANT``.

The result simulates an integer backend: activations and weights take only values on their
integer grids. Embedding tables with fewer than ``small_table_rows`` rows (BERT's token-type
table: 2 rows) stay float: every token adds one of their few rows, so a row's rounding error
is a bias repeated on every token (on MiniLM the 2-row table alone costs 1.5e-4 of embedding
cosine, the 30522-row word table 1.6e-5), and keeping them float costs a few kilobytes.
Biases stay float (backends keep them in int32 at scale s_x * s_w, which is finer than any
activation grid). Below 8 bits, the model's output head (the LM head) keeps 8-bit weights, as
embedding tables do (:func:`linear_weight_spec`).

On a graph captured without weights (:func:`~outlierfx.graph.weight_source.capture_without_weights`)
the weights are quantized one block at a time into int8 codes that the graph's weight source
holds (:func:`_quantize_weights_per_block`); materialized, they are the weights this pass gives
the loaded model's graph, bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.fx

from ..errors import PassError
from ..graph import meta
from ..graph.attrs import fetch_attr, replace_input_tensor
from ..graph.block_order import load_units
from ..graph.first_tokens import wire_first_tokens
from ..graph.ops import OpKind, feeds_only_outputs, op_kind
from ..graph.shapes import propagate_values
from ..graph.weight_source import hold, materialized
from ..memory import return_freed_memory
from ..quantizers.fake_quant import quantize_weight
from ..quantizers.integer_codes import HeldCodes, codes_required, quantize_to_codes
from ..quantizers.observers import FakeQuantize, Observer
from ..quantizers.spec import Granularity, QuantSpec
from .base import GraphPass


HEAD_MIN_BITS = 8


def linear_weight_spec(linear: torch.fx.Node, weight_spec: QuantSpec) -> QuantSpec:
    """The weight spec of ``linear``: ``weight_spec``, except that a Linear whose result is a
    model output (the LM head: its rounding error lands on every logit of every token, and
    nothing after it can correct it) keeps at least 8 bits. Common practice below 8 bits (GPTQ,
    AWQ, QuaRot and llm-compressor's W4 schemes leave the head at 8 or 16 bits); a structural
    rule, not a tuned one. The head's 8-bit grid is symmetric whatever the low-bit rows are (what
    the int8 kernels take). GPTQ rounds with the same spec."""
    if weight_spec.bits < HEAD_MIN_BITS and feeds_only_outputs(linear):
        return weight_spec.with_(bits=HEAD_MIN_BITS, symmetric=True, signed=True)
    return weight_spec


@dataclasses.dataclass(frozen=True)
class ConvertPlan:
    activations: tuple[str, ...]  # observer module names
    weights: tuple[torch.fx.Node, ...]  # Linear nodes whose weight is quantized
    weight_spec: QuantSpec | None
    grouped: tuple[tuple[str, int, tuple[int, ...]], ...] = ()  # (quantizer, K, channel permutation)
    embeddings: tuple[torch.fx.Node, ...] = ()  # embedding lookups whose table is quantized
    embedding_spec: QuantSpec | None = None
    float_tables: tuple[tuple[str, int], ...] = ()  # (table, rows) kept float: too few rows to pay
    tied_heads: tuple[torch.fx.Node, ...] = ()  # Linears reading a quantized table: on the table's grid
    heads: tuple[tuple[torch.fx.Node, QuantSpec], ...] = ()  # output Linears kept wider (linear_weight_spec)

    def summary(self) -> str:
        spec = self.weight_spec.describe() if self.weight_spec else "float"
        line = f"{len(self.activations)} activation quantizers; {len(self.weights)} Linear weights ({spec})"
        if self.embeddings and self.embedding_spec is not None:
            line += f"; {len(self.embeddings)} embedding tables ({self.embedding_spec.describe()}, rows)"
        if self.heads:
            line += f"; output head(s) at {self.heads[0][1].describe()}: {[n.name for n, _ in self.heads]}"
        if self.tied_heads:
            line += f"; {len(self.tied_heads)} Linear(s) tied to an embedding table read its grid (one tensor, stored once)"
        if self.float_tables:
            line += f"; small tables kept float (a per-token bias when rounded): {list(self.float_tables)}"
        if self.grouped:
            line += f"; {len(self.grouped)} grouped (PEG, K={self.grouped[0][1]}), permutations in the JSON report"
        return line


def wire_sink_quantizers(gm: torch.fx.GraphModule, created_by: str) -> None:
    """Give every quantizer with a first-token grid the graph's first-token mask (each text's
    first real tokens, :func:`~outlierfx.graph.first_tokens.wire_first_tokens`): without it a
    left-padded batch puts padding on the first-token grid and its first token on the main one."""
    readers = [(node, getattr(gm, str(node.target)).spec.sink_tokens) for node in gm.graph.nodes
               if node.op == "call_module" and isinstance(getattr(gm, str(node.target)), FakeQuantize)
               and getattr(gm, str(node.target)).has_sink_grid]
    if wire_first_tokens(gm, readers, created_by):
        propagate_values(gm)
        gm.recompile()


class ConvertToFakeQuant(GraphPass[ConvertPlan]):
    output_rel_tol = None  # quantization changes numerics on purpose; the error is recorded

    def __init__(self, weight_spec: QuantSpec | None, embedding_spec: QuantSpec | None = None,
                 small_table_rows: int = 64) -> None:
        self.weight_spec = weight_spec
        self.embedding_spec = embedding_spec
        self.small_table_rows = small_table_rows

    def analyze(self, gm: torch.fx.GraphModule) -> ConvertPlan:
        names = tuple(name for name, m in gm.named_children() if isinstance(m, Observer))
        for name in names:
            if not getattr(gm, name).calibrated:
                raise PassError(f"observer {name} is not calibrated; run calibrate() before converting")
        linears = tuple(n for n in gm.graph.nodes if op_kind(n) is OpKind.LINEAR and self.weight_spec is not None)
        grouped = tuple((name, getattr(gm, name).spec.groups, getattr(gm, name).permutation() or ())
                        for name in names if getattr(gm, name).spec.granularity is Granularity.PER_GROUP)
        tables = [n for n in gm.graph.nodes if op_kind(n) is OpKind.EMBEDDING and isinstance(n.args[0], torch.fx.Node)
                  and n.args[0].op == "get_attr" and self.embedding_spec is not None]
        rows = {n: fetch_attr(gm, str(n.args[0].target)).shape[0] for n in tables}
        embeddings = tuple(n for n in tables if rows[n] >= self.small_table_rows)
        small = tuple((str(n.args[0].target), rows[n]) for n in tables if rows[n] < self.small_table_rows)
        # A Linear whose weight is a quantized table (an LM head tied to the embedding) takes the
        # table's spec: both readers then share one quantized tensor, where a head-only grid (int4
        # at W4A8, MSE-clipped rows) would store a second copy of the model's largest matrix.
        quantized_tables = {str(n.args[0].target) for n in embeddings}
        tied = tuple(n for n in linears if isinstance(n.args[1], torch.fx.Node) and n.args[1].op == "get_attr"
                     and str(n.args[1].target) in quantized_tables)
        linears = tuple(n for n in linears if n not in tied)
        specs = {n: linear_weight_spec(n, self.weight_spec) for n in linears} if self.weight_spec is not None else {}
        heads = tuple((n, spec) for n, spec in specs.items() if spec != self.weight_spec)
        linears = tuple(n for n in linears if specs[n] == self.weight_spec)
        return ConvertPlan(names, linears, self.weight_spec, grouped, embeddings, self.embedding_spec, small, tied,
                           heads)

    def apply(self, gm: torch.fx.GraphModule, plan: ConvertPlan) -> bool:
        for name in plan.activations:
            setattr(gm, name, FakeQuantize.from_observer(getattr(gm, name)))
        wire_sink_quantizers(gm, type(self).__name__)
        work = ([(n, 1, plan.weight_spec) for n in plan.weights] + [(n, 1, spec) for n, spec in plan.heads]
                + [(n, 1, plan.embedding_spec) for n in plan.tied_heads]
                + [(n, 0, plan.embedding_spec) for n in plan.embeddings])
        if gm.meta.get(meta.GM_WEIGHT_SOURCE) is None:
            _quantize_weights(gm, work)
        else:
            _quantize_weights_per_block(gm, work)
        return bool(plan.activations or plan.weights or plan.heads or plan.tied_heads or plan.embeddings)


WeightWork = list[tuple[torch.fx.Node, int, QuantSpec]]  # (reader, position of its weight argument, spec)
Quantize = Callable[[str, torch.Tensor, QuantSpec], torch.Tensor]  # (target, weight, spec) -> the value to register


def _fake_quantized(target: str, weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return quantize_weight(weight, spec)[0]


def _quantize_weights(gm: torch.fx.GraphModule, work: WeightWork, quantize: Quantize = _fake_quantized
                      ) -> dict[str, torch.Tensor]:
    """Put each reader's weight on its grid (``quantize``); returns target -> the value now
    registered there, for each target that holds a quantized weight. A tied table (lm_head =
    embedding) is quantized once per spec: at equal specs (per-row int8 both) the two readers
    keep sharing one tensor."""
    quantized: dict[tuple[str, QuantSpec], torch.Tensor] = {}
    registered: dict[str, torch.Tensor] = {}
    for node, index, spec in work:
        weight_node = node.args[index]
        key = (str(weight_node.target), spec)
        if key not in quantized:
            quantized[key] = quantize(key[0], fetch_attr(gm, key[0]), spec)
        now_read = replace_input_tensor(gm, node, weight_node, quantized[key], "_quantized")
        registered[str(now_read.target)] = quantized[key]
        node.meta[meta.WEIGHT_QUANT] = spec
        node.meta[meta.CREATED_BY] = node.meta.get(meta.CREATED_BY, ConvertToFakeQuant.__name__)
    return registered


def _quantize_weights_per_block(gm: torch.fx.GraphModule, work: WeightWork) -> None:
    """A graph captured without weights: one load unit at a time (a block's weights; a tensor read
    outside blocks), its weights are loaded, quantized straight into int8 codes (row by row:
    :func:`~outlierfx.quantizers.integer_codes.quantize_to_codes`), which the weight source
    holds, and released, so no more than one block's float weights are in memory. The graph
    registers meta stand-ins for the quantized weights; materialized, the codes rebuild them
    bit for bit: the graph is the full-memory conversion's (issue 28; docs/experiments/memory.md)."""
    unit_of = {target: unit.name for unit in load_units(gm, [node for node, _, _ in work]) for target in unit.targets}
    by_unit: dict[str, WeightWork] = {}
    for node, index, spec in work:
        by_unit.setdefault(unit_of[str(node.args[index].target)], []).append((node, index, spec))
    held: dict[int, HeldCodes] = {}  # id of a stand-in -> the codes it stands for

    def to_codes(target: str, weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        codes = quantize_to_codes(weight, spec)
        if codes is None:
            raise codes_required(f"{target}, quantized,", weight, spec)
        stand_in = torch.empty_like(weight, device="meta")
        held[id(stand_in)] = codes
        return stand_in

    for unit_work in by_unit.values():
        with materialized(gm, [str(node.args[index].target) for node, index, _ in unit_work]):
            registered = _quantize_weights(gm, unit_work, to_codes)
        hold(gm, {target: held[id(stand_in)] for target, stand_in in registered.items()})
        # the unit's float weights were freed between live tensors (the codes so far), which
        # glibc keeps in its heap: without this SmolLM2's conversion kept 400 MB it had freed
        return_freed_memory()
