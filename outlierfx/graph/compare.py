"""Numeric comparison of model outputs (any pytree: tensors, tuples, Hugging Face ModelOutputs)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.utils._pytree as pytree


@dataclasses.dataclass(frozen=True)
class OutputError:
    """How far ``actual`` is from ``reference`` over all floating-point output tensors.

    ``max_rel`` is the max absolute error divided by the reference's max magnitude, the scale
    that matters for quantized tensors (a per-element ratio explodes near zero).
    """

    max_abs: float
    max_rel: float
    reference_max: float
    nonfinite: int

    def within(self, rel_tol: float) -> bool:
        return self.nonfinite == 0 and self.max_rel <= rel_tol

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def float_leaves(outputs: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.dtype.is_floating_point]


def masked_mse(actual: Any, reference: Any, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over the float outputs of the mean squared difference (differentiable in ``actual``);
    outputs shaped ``[batch, seq, ...]`` count real tokens only when ``token_mask`` is given."""
    total = torch.zeros(())
    keep = None if token_mask is None or bool(token_mask.all()) else token_mask.bool()
    for act, ref in zip(float_leaves(actual), float_leaves(reference)):
        if keep is not None and act.dim() >= 2 and tuple(act.shape[:2]) == tuple(keep.shape):
            act, ref = act[keep], ref[keep]
        total = total + (act - ref).pow(2).mean()
    return total


def output_error(reference: Any, actual: Any, token_mask: torch.Tensor | None = None) -> OutputError:
    """Largest difference over the float outputs; with ``token_mask`` (``[batch, seq]``, e.g. the
    attention mask) outputs shaped ``[batch, seq, ...]`` are compared at real tokens only:
    padded positions carry no meaning and a quantized graph leaves them anywhere."""
    ref_leaves, act_leaves = float_leaves(reference), float_leaves(actual)
    if len(ref_leaves) != len(act_leaves):
        raise ValueError(f"outputs differ in structure: {len(ref_leaves)} vs {len(act_leaves)} float tensors")
    max_abs, ref_max, nonfinite = 0.0, 0.0, 0
    keep = None if token_mask is None else token_mask.bool()
    for ref_leaf, act_leaf in zip(ref_leaves, act_leaves):
        if ref_leaf.shape != act_leaf.shape:
            raise ValueError(f"output shapes differ: {tuple(ref_leaf.shape)} vs {tuple(act_leaf.shape)}")
        for ref, act in _pieces(ref_leaf.detach(), act_leaf.detach(), keep):
            if bool(torch.isfinite(ref).all()) and bool(torch.isfinite(act).all()):  # the common, fast path
                if ref.numel():  # differences in float64 (exact for float32), as on the path below, in place
                    max_abs = max(max_abs, float(ref.to(torch.float64, copy=True).sub_(act).abs_().max()))
                    ref_max = max(ref_max, float(ref.abs().max()))
                continue
            nonfinite += int((~torch.isfinite(act)).sum() - (~torch.isfinite(ref)).sum())
            finite = torch.isfinite(ref) & torch.isfinite(act)
            if finite.any():
                max_abs = max(max_abs, float((ref[finite].double() - act[finite].double()).abs().max()))
                ref_max = max(ref_max, float(ref[finite].abs().max()))
    max_rel = max_abs / ref_max if ref_max > 0 else (0.0 if max_abs == 0 else float("inf"))
    return OutputError(max_abs=max_abs, max_rel=max_rel, reference_max=ref_max, nonfinite=max(nonfinite, 0))


# elements compared at a time (4 MB of float32, its float64 difference 8 MB): with 4M, the
# pieces' temporaries and the heap pages glibc kept after them added 110-150 MB to the lowered
# check's peak on SmolLM2 (docs/experiments/memory.md, section 5)
_PIECE = 1 << 20


def _pieces(ref: torch.Tensor, act: torch.Tensor, keep: torch.Tensor | None
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Matching pieces of ``ref`` and ``act`` of about ``_PIECE`` elements: runs of one sequence's
    real tokens where ``keep`` masks them, else slices of the flattened tensors. Maxima and
    counts over the pieces are those over the whole, and the temporaries stay piece-sized:
    whole, a decoder's logits (8 x 128 x 49,152 floats: 201 MB) took four more copies."""
    if keep is not None and ref.dim() >= 2 and tuple(ref.shape[:2]) == tuple(keep.shape):
        per_piece = max(1, _PIECE // max(1, math.prod(ref.shape[2:])))
        for row in range(ref.shape[0]):
            tokens = keep[row].nonzero().flatten()
            for start in range(0, tokens.numel(), per_piece):
                index = tokens[start:start + per_piece]
                yield ref[row].index_select(0, index), act[row].index_select(0, index)
        return
    ref, act = ref.reshape(-1), act.reshape(-1)
    for start in range(0, max(ref.numel(), 1), _PIECE):
        yield ref[start:start + _PIECE], act[start:start + _PIECE]


def run(module: torch.nn.Module, inputs: tuple[tuple, dict]) -> Any:
    """Call ``module`` on ``(args, kwargs)`` without autograd."""
    args, kwargs = inputs
    with torch.no_grad():
        return module(*args, **kwargs)
