"""``torch.ops.outlierfx.hadamard``: an online rotation of the last axis by ``kron(left, right)``.

Rotation passes that cannot fold a rotation into weights on both sides (the SwiGLU/GELU output
read by an FFN's output Linear: the activation between the two Linears does not commute with a
rotation) insert this op and fold its inverse into the reading Linear. It is one graph node, so
the audit and the quantization passes see one op (not matmuls that look like attention), and
every backend runs it as a float op before the int8 GEMM's input quantization: two small
GEMMs, ``c + p`` multiply-adds per element (:class:`~outlierfx.quantizers.hadamard.KroneckerRotation`).
"""

from __future__ import annotations

import torch


def rotate_last_axis(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``x @ kron(left, right)`` on the last axis: with x's last axis viewed as ``c x p`` rows
    X, ``left^T X right``. The op's one definition: the custom op runs it, and inductor's copy of
    a graph calls it in the op's place, so that the compiler sees (and compiles in) its GEMMs."""
    c, p = left.shape[0], right.shape[0]
    rows = x.reshape(-1, c, p) @ right  # one (tokens * c) x p GEMM
    # left^T times each token's c x p block: a batched GEMM on the blocks as they lie (a transpose
    # to one (tokens * p) x c GEMM and back cost two copies, and 2x the time on SmolLM2's d=1536)
    return torch.matmul(left.T, rows).reshape(x.shape)


@torch.library.custom_op("outlierfx::hadamard", mutates_args=())
def hadamard(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """The online rotation as one graph node (:func:`rotate_last_axis`)."""
    return rotate_last_axis(x, left, right)


@hadamard.register_fake
def _(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


HADAMARD = torch.ops.outlierfx.hadamard.default
