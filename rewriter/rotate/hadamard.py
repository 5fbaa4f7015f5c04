"""Orthogonal matrices for the residual-stream rotation.

`rotation(n, seed)` is a random-sign Hadamard matrix diag(s)·H/√n where a Hadamard matrix of
order n is built here, else a seeded random orthogonal matrix (QR of a Gaussian). Hadamard
orders: Kronecker products of Sylvester's 2 and Paley's constructions over a prime q
(Paley I: q ≡ 3 mod 4 gives q + 1; Paley II: q ≡ 1 mod 4 gives 2(q + 1)), e.g. 12 (q = 11),
20 (q = 19), 28 (q = 13), 576 = 12·12·4. A Hadamard rotation spreads every channel over all
others with equal weight, which is what flattens outlier channels; everything is float64.
"""

from __future__ import annotations

import functools

import numpy as np


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = χ(j − i) over GF(q), q prime (χ the quadratic character, χ(0) = 0)."""
    squares = {(k * k) % q for k in range(1, q)}
    chi = np.array([0] + [1 if k in squares else -1 for k in range(1, q)], dtype=np.int64)
    idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[idx]


def _bordered_jacobsthal(q: int, first_column: int) -> np.ndarray:
    """[[0, 1ᵀ], [first_column·1, Q]], Q the Jacobsthal matrix of GF(q)."""
    c = np.zeros((q + 1, q + 1), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = first_column
    c[1:, 1:] = _jacobsthal(q)
    return c


def _paley1(q: int) -> np.ndarray:
    """Order q + 1, q ≡ 3 (mod 4) prime."""
    return _bordered_jacobsthal(q, -1) + np.eye(q + 1, dtype=np.int64)


def _paley2(q: int) -> np.ndarray:
    """Order 2(q + 1), q ≡ 1 (mod 4) prime."""
    c = _bordered_jacobsthal(q, 1)
    one = np.array([[1, -1], [-1, -1]], dtype=np.int64)
    zero = np.array([[1, 1], [1, -1]], dtype=np.int64)
    return np.kron(c, one) + np.kron(np.eye(q + 1, dtype=np.int64), zero)


def _base(order: int) -> np.ndarray | None:
    """A Hadamard matrix of `order` from one construction (not a product), or None."""
    if order == 1:
        return np.ones((1, 1), dtype=np.int64)
    if order == 2:
        return np.array([[1, 1], [1, -1]], dtype=np.int64)
    q = order - 1
    if q % 4 == 3 and _is_prime(q):
        return _paley1(q)
    if order % 2 == 0:
        q = order // 2 - 1
        if q % 4 == 1 and _is_prime(q):
            return _paley2(q)
    return None


@functools.lru_cache(maxsize=None)
def hadamard(n: int) -> np.ndarray | None:
    """An n×n matrix of ±1 with H·Hᵀ = n·I built from the constructions above, or None."""
    if n < 1:
        return None
    direct = _base(n)
    if direct is not None:
        return direct
    # the largest factor first keeps the search short; every factor is itself a Hadamard order
    for factor in range(n // 2, 1, -1):
        if n % factor or factor % 2:    # orders above 2 are multiples of 4
            continue
        left, right = hadamard(factor), hadamard(n // factor)
        if left is not None and right is not None:
            return np.kron(left, right)
    return None


def rotation(n: int, seed: int = 0, fix_ones: bool = False) -> tuple[np.ndarray, str]:
    """(Q, kind): an n×n orthogonal float64 matrix, reproducible from `seed`. kind says how it
    was built: "hadamard" (random signs times a normalized Hadamard matrix) or "orthogonal"
    (no Hadamard construction of order n here: a random orthogonal matrix).

    fix_ones: Q·1 = 1 (and so 1ᵀ·Q = 1ᵀ), as a LayerNorm's mean subtraction needs: with H's
    first column made all ones, Q = H·diag(1, s₂, …, sₙ)·Hᵀ/n; without a Hadamard matrix, a
    random rotation of the complement of 1."""
    rng = np.random.default_rng(seed)
    h = hadamard(n)
    if h is not None:
        h = h.astype(np.float64)
        signs = rng.choice(np.array([-1.0, 1.0]), size=n)
        if not fix_ones:
            return signs[:, None] * h / np.sqrt(n), "hadamard"
        h = h * h[:, :1]            # rows times their first entry: the first column is all ones
        signs[0] = 1.0
        return (h * signs[None, :]) @ h.T / n, "hadamard"
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    q = q * np.sign(np.diag(r))[None, :]
    if not fix_ones:
        return q, "orthogonal"
    # Householder P swaps e₁ and 1/√n; P·diag(1, R)·P fixes 1 and rotates its complement by R
    u = np.ones(n) / np.sqrt(n)
    u[0] -= 1.0
    p = np.eye(n) - 2.0 * np.outer(u, u) / (u @ u) if n > 1 else np.eye(n)
    inner = np.eye(n)
    if n > 1:
        inner[1:, 1:] = np.linalg.qr(rng.standard_normal((n - 1, n - 1)))[0]
    return p @ inner @ p, "orthogonal"


__all__ = ["hadamard", "rotation"]
