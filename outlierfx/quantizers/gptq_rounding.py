"""GPTQ's rounding of one weight matrix, without any graph (Frantar et al. 2022): the per-row
grid the conversion would use, OBQ-style error feedback over the columns with a Cholesky-factored
inverse Hessian, and the layer's output error ``tr((W - Q) H (W - Q)^T)``. The pass that finds
the Linears, records their Gram matrices and writes the rounded weights back is
:class:`outlierfx.passes.gptq.GPTQ`.
"""

from __future__ import annotations

import torch

from .fake_quant import quantize_weight
from .spec import Estimator, Granularity, QuantSpec


def row_grid(weight: torch.Tensor, spec: QuantSpec, gram: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero point (all zero on a symmetric grid) of ``weight`` under ``spec``,
    as ConvertToFakeQuant computes them; an MSE range weighs each input column's error by its Gram
    diagonal (what that column's error costs at the output) where the spec is per row and
    ``gram`` is given."""
    per_row = spec.granularity is Granularity.PER_CHANNEL
    columns = torch.diagonal(gram).to(weight.dtype) if gram is not None and per_row and \
        spec.estimator is Estimator.MSE else None
    _, scale, zero_point = quantize_weight(weight, spec, columns)
    if spec.granularity is Granularity.PER_TENSOR:
        scale, zero_point = scale.reshape(1).expand(weight.shape[0]), zero_point.reshape(1).expand(weight.shape[0])
    return scale.to(weight.dtype), zero_point


def _code_range(spec: QuantSpec) -> tuple[int, int]:
    """The codes a weight may take: ``[-qmax, qmax]`` on a symmetric grid (no ``qmin`` code, so
    that min-max reads the scale back from max |w|), the whole ``[qmin, qmax]`` otherwise."""
    return (-spec.qmax, spec.qmax) if spec.symmetric else (spec.qmin, spec.qmax)


def nearest_codes(weight: torch.Tensor, step: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest codes of ``weight`` (rows) at per-row ``step`` and ``zero`` (column vectors)."""
    return torch.clamp(torch.round(weight.double() / step) + zero, *_code_range(spec))


def _restore_readable_range(codes: torch.Tensor, nearest: torch.Tensor, zero: torch.Tensor, spec: QuantSpec
                            ) -> tuple[torch.Tensor, int]:
    """``codes`` with each row's grid readable back by min-max (conversion, lowering), and how many
    rows needed it. Min-max finds a row's grid from its extreme codes: a symmetric row needs a code
    at +-qmax; an asymmetric one a code at qmin (unless its zero point is qmin: then 0 is the
    range's low end) and one at qmax (unless its zero point is qmax). Where GPTQ's rounding left
    such an end empty that round-to-nearest filled, restore the code of the weight that
    round-to-nearest put there."""
    zero = zero[:, 0]
    if spec.symmetric:
        ends = [((codes.abs().amax(1) < spec.qmax) & (nearest.abs().amax(1) == spec.qmax), nearest.abs().argmax(1))]
    else:
        ends = [((codes.amin(1) > spec.qmin) & (nearest.amin(1) == spec.qmin) & (zero > spec.qmin),
                 nearest.argmin(1)),
                ((codes.amax(1) < spec.qmax) & (nearest.amax(1) == spec.qmax) & (zero < spec.qmax),
                 nearest.argmax(1))]
    restored = torch.zeros(codes.shape[0], dtype=torch.bool)
    for lost, column in ends:
        rows = lost.nonzero()[:, 0]
        codes[rows, column[rows]] = nearest[rows, column[rows]]
        restored |= lost
    return codes, int(restored.sum())


def _refit_row_steps(weight: torch.Tensor, levels: torch.Tensor, gram: torch.Tensor, step: torch.Tensor
                     ) -> torch.Tensor:
    """Per row (a column vector), the step that minimises the row's output error with its
    integer ``levels`` (codes minus zero point) fixed: ``(w - s q) H (w - s q)^T`` is a parabola
    in ``s``, lowest at ``s = w H q^T / q H q^T``; ``step`` where that is not a positive number
    (a row of zero levels, or inputs that never reach it)."""
    w, h = weight.detach().double(), gram.double()
    numerator, denominator = ((w @ h) * levels).sum(1), ((levels @ h) * levels).sum(1)
    refit = numerator / denominator.clamp_min(1e-300)
    return torch.where((denominator > 0) & (refit > 0), refit, step[:, 0]).unsqueeze(1)


def gptq_round(weight: torch.Tensor, gram: torch.Tensor, spec: QuantSpec, damp: float = 0.01,
               block: int = 128, grid: tuple[torch.Tensor, torch.Tensor] | None = None,
               act_order: bool = True, refit_scales: bool = False) -> tuple[torch.Tensor, int]:
    """GPTQ-rounded ``weight`` (rows = outputs) on ``spec``'s grid for inputs with Gram matrix
    ``gram`` (its per-row scales and zero points ``grid``, when the caller has them, from
    :func:`row_grid`), and how many rows needed an end of their range restored
    (:func:`_restore_readable_range`). A code k stands for ``(k - zero point) * scale``.

    ``act_order`` rounds the columns in order of decreasing ``H_jj`` (the GPTQ paper's "act
    order", AutoGPTQ's ``desc_act``): the columns whose errors cost most at the output go first,
    while every other column can still absorb their error. False: in the weight's own column
    order. The grid is per row and fixed before rounding, so the order changes only which codes
    the weights get, never the grid (the codes are put back in column order at the end).

    ``refit_scales`` then gives each row the step that fits its codes best at the output
    (:func:`_refit_row_steps`, least squares): the same codes and zero point on a grid with that
    step, which min-max reads back like any other row."""
    scale, zero_point = row_grid(weight, spec, gram) if grid is None else grid
    step, zero = scale.unsqueeze(1).double(), zero_point.unsqueeze(1).double()
    low, high = _code_range(spec)
    w = weight.detach().double().clone()
    h = gram.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(h.shape[0])
    w, h = w[:, order], h[order][:, order]
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros_like(w)
    columns = w.shape[1]
    for start in range(0, columns, block):
        stop = min(start + block, columns)
        wb, hb = w[:, start:stop].clone(), hinv[start:stop, start:stop]
        errors = torch.zeros_like(wb)
        for i in range(stop - start):
            k = torch.clamp(torch.round(wb[:, i:i + 1] / step) + zero, low, high)
            codes[:, start + i] = k[:, 0]
            err = (wb[:, i:i + 1] - (k - zero) * step) / hb[i, i]
            wb[:, i:] -= err @ hb[i:i + 1, i:]
            errors[:, i:i + 1] = err
        w[:, stop:] -= errors @ hinv[start:stop, stop:]
    codes = codes[:, torch.argsort(order)]
    codes, restored = _restore_readable_range(codes, nearest_codes(weight.detach(), step, zero, spec), zero, spec)
    levels = codes - zero
    if refit_scales:
        step = _refit_row_steps(weight, levels, gram, step)
    return (levels * step).to(weight.dtype), restored


def layer_error(weight: torch.Tensor, rounded: torch.Tensor, gram: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)``: the summed squared output error over the Gram matrix's inputs."""
    delta = (weight.double() - rounded.double())
    return float(torch.einsum("oi,ij,oj->", delta, gram.double(), delta))
