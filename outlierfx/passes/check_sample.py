"""The pass manager's check sample: the sequences of the example batch its checks run on.

Each check runs the graph on the sample and holds the reference outputs and the previous pass's,
so the checks' memory follows the size of the compared outputs, whatever the model's: SmolLM2's
logits on its 8 x 128 example are 8 x 128 x 49,152 floats (201 MB each; docs/experiments/memory.md,
section 5). Where the compared outputs of the whole example would exceed
:data:`CHECK_OUTPUT_ELEMENTS`, the checks run on as many of its sequences as fit (at least one),
those with the most real tokens; the audit says on how many sequences and tokens each check ran.
A check on fewer sequences proves the same thing of every position it sees (a rewrite exact, or
within its tolerance): the graph computes each sequence on its own.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from ..graph import meta
from ..graph.probe import flatten_inputs

# Compared output elements the whole example may have before the checks take a sample of its
# sequences: 8M floats, 32 MB per held output (one sequence of SmolLM2's 128 x 49,152 logits; two
# left the weight-free run's peak 80 MB higher, above 40% of the loaded run's).
CHECK_OUTPUT_ELEMENTS = 1 << 23


@dataclasses.dataclass(frozen=True)
class CheckSample:
    """What a pass-manager check ran on: ``sequences`` of the example's ``of_sequences`` (its
    batch), holding ``tokens`` real tokens (by its attention mask; None without one)."""

    sequences: int
    of_sequences: int
    tokens: int | None

    @property
    def whole_example(self) -> bool:
        return self.sequences == self.of_sequences

    def describe(self) -> str:
        which = "all" if self.whole_example else f"{self.sequences} of"
        tokens = f" ({self.tokens} tokens)" if self.tokens is not None else ""
        return f"{which} {self.of_sequences} sequences of the example{tokens}"

    def as_dict(self) -> dict[str, int | None]:
        return dataclasses.asdict(self)


Inputs = tuple[tuple[Any, ...], dict[str, Any]]


def check_sample(gm: torch.fx.GraphModule, inputs: Inputs, max_elements: int | None = None
                 ) -> tuple[Inputs, CheckSample | None]:
    """``inputs`` (the example) cut to the sequences the checks of ``gm`` run on, and what they
    are. The batch dimension is the first input's first dimension where the graph keeps it
    symbolic (captured with dynamic shapes); every input whose first dimension is that symbol is
    cut. A graph with a static batch, or inputs the graph's placeholders do not describe, is
    checked on the whole example (``None``: nothing known about its sequences)."""
    limit = CHECK_OUTPUT_ELEMENTS if max_elements is None else max_elements
    placeholders = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    flat = flatten_inputs(gm, *inputs)
    if len(flat) != len(placeholders):
        return inputs, None
    batch_symbol = next((_symbol(v.shape[0]) for v in placeholders if isinstance(v, torch.Tensor) and v.dim()), None)
    batched = {id(t) for t, v in zip(flat, placeholders)
               if isinstance(t, torch.Tensor) and isinstance(v, torch.Tensor) and v.dim()
               and batch_symbol is not None and _symbol(v.shape[0]) == batch_symbol}
    first = next((t for t in flat if id(t) in batched), None)
    if first is None:
        return inputs, None
    size = first.shape[0]
    # torch.export gives a batch dimension no graph op ties to the first input's its own symbol
    # (an attention mask whose batch only broadcasts): an input laid out [batch, tokens] like the
    # first one (the same tokens symbol, as many rows) is cut with it
    tokens_symbol = next((_symbol(v.shape[1]) for t, v in zip(flat, placeholders) if t is first and v.dim() > 1),
                         None)
    batched |= {id(t) for t, v in zip(flat, placeholders)
                if tokens_symbol is not None and isinstance(t, torch.Tensor) and isinstance(v, torch.Tensor)
                and v.dim() > 1 and t.shape[0] == size and _symbol(v.shape[1]) == tokens_symbol}
    per_sequence = _output_elements_per_sequence(gm, batch_symbol)
    keep = size if per_sequence is None else max(1, min(size, limit // max(per_sequence, 1)))
    mask = inputs[1].get("attention_mask")
    real = mask.reshape(size, -1).bool().sum(1) if isinstance(mask, torch.Tensor) and id(mask) in batched else None
    if keep == size:
        return inputs, CheckSample(size, size, None if real is None else int(real.sum()))
    # the sequences with the most real tokens (the first ones without a mask), in their order
    ranked = torch.arange(size) if real is None else torch.argsort(real, descending=True, stable=True)
    chosen = torch.sort(ranked[:keep]).values
    leaves, spec = pytree.tree_flatten(inputs)
    cut = [t.index_select(0, chosen) if isinstance(t, torch.Tensor) and id(t) in batched else t for t in leaves]
    return pytree.tree_unflatten(cut, spec), CheckSample(keep, size, None if real is None else int(real[chosen].sum()))


def _symbol(dim: Any) -> str | None:
    """A symbolic size's expression (``s0``), or None for a static one."""
    if isinstance(dim, torch.SymInt) and not dim.node.expr.is_number:
        return str(dim.node.expr)
    return None


def _output_elements_per_sequence(gm: torch.fx.GraphModule, batch_symbol: str) -> int | None:
    """Elements per sequence of the outputs the checks compare (from the captured sizes), or None
    where the output node's values say nothing of them."""
    outputs = meta.compared_outputs(gm, gm.graph.output_node().args[0])
    total = 0
    for node in pytree.tree_leaves(outputs):
        value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
            continue
        if not value.dim() or _symbol(value.shape[0]) != batch_symbol:
            return None  # an output that a sample would not shrink
        sizes = [_hint(d) for d in value.shape[1:]]
        if any(s is None for s in sizes):
            return None
        total += math.prod(sizes)  # type: ignore[arg-type]
    return total or None


def _hint(dim: Any) -> int | None:
    """A size as the example had it (a symbolic size's hint)."""
    if isinstance(dim, torch.SymInt):
        hint = dim.node.hint
        return int(hint) if hint is not None else None
    return int(dim)
