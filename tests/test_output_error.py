"""graph.compare.output_error: the pass manager's check, compared piece by piece (a decoder's
logits are hundreds of MB; whole, the differences took several copies of them)."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from outlierfx.graph import compare


def _whole(reference: torch.Tensor, actual: torch.Tensor, mask: torch.Tensor | None) -> tuple[float, float, int]:
    """max |ref - act|, max |ref| and the extra non-finite count over the (masked) tensors at once."""
    if mask is not None and reference.dim() >= 2 and tuple(reference.shape[:2]) == tuple(mask.shape):
        reference, actual = reference[mask.bool()], actual[mask.bool()]
    finite = torch.isfinite(reference) & torch.isfinite(actual)
    extra = int((~torch.isfinite(actual)).sum() - (~torch.isfinite(reference)).sum())
    if not finite.any():
        return 0.0, 0.0, max(extra, 0)
    diff = (reference[finite].double() - actual[finite].double()).abs().max()
    return float(diff), float(reference[finite].abs().max()), max(extra, 0)


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(0, 5), min_size=0, max_size=4), piece=st.sampled_from([1, 3, 7, 1 << 22]),
       masked=st.booleans(), nonfinite=st.booleans(), seed=st.integers(0, 2**16))
def test_pieces_give_the_whole_tensors_maxima_and_counts(shape, piece, masked, nonfinite, seed):
    gen = torch.Generator().manual_seed(seed)
    reference = torch.randn(shape, generator=gen)
    actual = reference + 0.01 * torch.randn(shape, generator=gen)
    if nonfinite and actual.numel():
        actual.view(-1)[torch.randint(0, actual.numel(), (2,), generator=gen)] = float("nan")
        reference.view(-1)[0] = float("inf")
    mask = (torch.rand(shape[:2], generator=gen) > 0.3).long() if masked and len(shape) >= 2 else None
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compare, "_PIECE", piece)
        error = compare.output_error(reference, actual, mask)
    assert (error.max_abs, error.reference_max, error.nonfinite) == _whole(reference, actual, mask)


def test_a_masked_logits_comparison_is_computed_a_few_tokens_at_a_time(monkeypatch):
    """Each piece holds at most _PIECE elements: for [batch, seq, vocab] logits, a run of one
    sequence's real tokens, never the whole masked selection."""
    sizes = []
    real_pieces = compare._pieces

    def recording(ref, act, keep):
        for r, a in real_pieces(ref, act, keep):
            sizes.append(r.numel())
            yield r, a

    monkeypatch.setattr(compare, "_PIECE", 3 * 10)
    monkeypatch.setattr(compare, "_pieces", recording)
    logits = torch.randn(2, 8, 10)
    compare.output_error(logits, logits + 1, torch.ones(2, 8))
    assert sizes and max(sizes) <= 30 and sum(sizes) == logits.numel()


def test_a_float64_reference_is_left_as_it_was():
    """The differences are taken in place on a float64 copy of each piece: a float64 reference's
    pieces are views of it, and ``.double()`` of one would be the view itself."""
    reference = torch.linspace(-3, 3, 40, dtype=torch.float64).reshape(2, 4, 5)
    kept = reference.clone()
    error = compare.output_error(reference, reference + 0.25)
    assert error.max_abs == pytest.approx(0.25) and torch.equal(reference, kept)
