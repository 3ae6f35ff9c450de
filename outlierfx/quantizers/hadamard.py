"""Seeded orthogonal matrices for rotating activations before quantization (QuaRot-style).

Why: a per-tensor int8 grid is sized by the largest value, and transformer activations carry a
few huge channels. Multiplying by an orthogonal matrix whose entries all have the same magnitude
(a normalized Hadamard matrix) spreads every channel over all of them, so no channel dominates;
folded into the weights around it, the rotation is free at run time and exact in real
arithmetic. Passes (``RotateResidual``) fold these matrices into weights; the same builder serves
any later online transform.

Constructions, tried in this order for ``d = 2^k * m`` (``m`` odd):
- Sylvester ``[[H, H], [H, -H]]`` when ``d`` is a power of two;
- ``paley1(q) x sylvester``: Paley I of order ``q + 1`` for a prime ``q = 3 (mod 4)``, Kronecker
  product with a Sylvester matrix (MiniLM's 384 = 12 x 32, q = 11);
- ``paley2(q) x sylvester``: Paley II of order ``2(q + 1)`` for a prime ``q = 1 (mod 4)``
  (SmolLM2's 576 = 36 x 16, q = 17);
- otherwise a random orthogonal matrix (QR of a seeded Gaussian): still exact, but its entries do
  not share one magnitude, so outliers spread less evenly.
Paley constructions over prime powers that are not primes (GF(p^n) arithmetic) are not built.
Every Hadamard result is randomized by a seeded +-1 diagonal (QuaRot's randomized Hadamard),
so different seeds give different, equally flat rotations. Built in float64; callers cast.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Rotation(NamedTuple):
    matrix: torch.Tensor  # d x d, float64, orthogonal
    construction: str  # e.g. "sylvester", "paley2(17) x sylvester", "random-orthogonal"

    @property
    def is_hadamard(self) -> bool:
        """Whether all entries share one magnitude (1/sqrt(d))."""
        return self.construction != "random-orthogonal"


def hadamard(d: int, seed: int = 0) -> Rotation:
    """A seeded orthogonal ``d x d`` matrix: a randomized Hadamard matrix where a construction is
    known for ``d`` (see the module docstring), else a random orthogonal one."""
    if d < 1:
        raise ValueError(f"d must be positive, got {d}")
    generator = torch.Generator().manual_seed(seed)
    found = _hadamard_pm1(d)
    if found is None:
        gaussian = torch.randn(d, d, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        return Rotation(q * torch.sign(torch.diagonal(r)), "random-orthogonal")  # sign fix: Haar-distributed
    matrix, construction = found
    signs = torch.randint(0, 2, (d,), generator=generator).to(torch.float64) * 2 - 1
    return Rotation(signs[:, None] * matrix / d**0.5, construction)


class KroneckerRotation(NamedTuple):
    """An orthogonal ``d x d`` rotation ``kron(left, right)``, applied to a vector x without
    building it: viewed as a ``c x p`` matrix X, ``x kron(L, R)`` is ``L^T X R`` (c + p
    multiply-adds per element instead of d). What an *online* transform runs."""

    left: Rotation  # c x c (the identity where d has no split into two Hadamard orders)
    right: Rotation  # p x p

    @property
    def construction(self) -> str:
        return f"[{self.left.construction}] x [{self.right.construction}]"

    @property
    def matrix(self) -> torch.Tensor:
        return torch.kron(self.left.matrix, self.right.matrix)


# Online transforms cost c + p multiply-adds per element; factors stay at most this size (a
# bound on that cost and on building Paley matrices, not a tuned value).
MAX_FACTOR = 1024


def kronecker_hadamard(d: int, seed: int = 0) -> KroneckerRotation:
    """A seeded ``d x d`` Hadamard rotation as ``kron(left, right)`` with the smallest ``c + p``
    (d = 1536: 32 x 48), both at most ``MAX_FACTOR``; where ``d`` has no such split into two
    known Hadamard orders, the largest known order ``p`` dividing ``d`` with an identity
    ``left`` (Llama-7B's 11008 = 43 x 256): a block-diagonal rotation, still exact, spreading
    outliers within blocks of ``p`` channels only."""
    splits = [(c, d // c) for c in range(1, min(d, MAX_FACTOR) + 1) if d % c == 0 and d // c <= MAX_FACTOR]
    known = [(c, p) for c, p in splits if _construction(c) and _construction(p)]
    if known:
        c, p = min(known, key=lambda split: (split[0] + split[1], split[0]))
        return KroneckerRotation(hadamard(c, seed), hadamard(p, seed + 1))
    p = max(p for p in range(1, min(d, MAX_FACTOR) + 1) if d % p == 0 and _construction(p))
    identity = Rotation(torch.eye(d // p, dtype=torch.float64), "identity")
    return KroneckerRotation(identity, hadamard(p, seed + 1))


def _hadamard_pm1(d: int) -> tuple[torch.Tensor, str] | None:
    """An unnormalized +-1 Hadamard matrix of order ``d`` and how it was built, or None."""
    found = _construction(d)
    if found is None:
        return None
    name, q, power = found
    if name == "sylvester":
        return _sylvester(d), name
    core = (_paley1 if name == "paley1" else _paley2)(d // power)
    if power == 1:
        return core, f"{name}({q})"
    return torch.kron(core, _sylvester(power)), f"{name}({q}) x sylvester"


def _construction(d: int) -> tuple[str, int, int] | None:
    """How a Hadamard matrix of order ``d`` is built, without building it: (``"sylvester"``,
    0, d), or (``"paley1"``/``"paley2"``, q, the power of two the Paley core is tensored with)."""
    power = d & -d  # the largest power of two dividing d
    while power >= 1:  # core = d / power: the odd part first, then doubling
        core = d // power
        if core == 1:
            return "sylvester", 0, d
        for name, q in (("paley1", _paley1_q(core)), ("paley2", _paley2_q(core))):
            if q is not None:
                return name, q, power
        power //= 2
    return None


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % p for p in range(2, int(n**0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = chi(j - i)``, chi the quadratic character modulo the prime ``q``."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley1_q(order: int) -> int | None:
    q = order - 1
    return q if order >= 4 and q % 4 == 3 and _is_prime(q) else None


def _paley2_q(order: int) -> int | None:
    q = order // 2 - 1
    return q if order % 2 == 0 and q % 4 == 1 and _is_prime(q) else None


def _paley1(order: int) -> torch.Tensor:
    q = order - 1
    s = torch.zeros(order, order, dtype=torch.float64)  # skew conference matrix
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
    return torch.eye(order, dtype=torch.float64) + s


def _paley2(order: int) -> torch.Tensor:
    q = order // 2 - 1
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)  # symmetric conference matrix
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
    plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, plus) + torch.kron((c == 0).to(torch.float64), zero)
