"""Low-rank building blocks: singular spectra of blocks and their truncated factors.

Error accounting is exact for the factors we produce. For a matrix ``B`` and an orthonormal
basis ``Q``, the SVD ``Q^T B = Ũ Σ Ṽ^T`` gives rank-k approximations ``(Q Ũ_k) Σ_k Ṽ_k^T = P_k B``
with ``P_k`` an orthogonal projector, hence
``||B - P_k B||_F^2 = ||B||_F^2 - sum_{i<k} σ_i^2``. With ``Q`` from an exact SVD this is the
Eckart-Young optimum; with ``Q`` from a randomized range finder (Halko, Martinsson, Tropp,
SIAM Review 53(2), 2011, doi:10.1137/090771806) it is the exact error of what we store.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

__all__ = ["Spectrum", "exact_spectra", "randomized_spectrum", "tail_energy", "split_factors"]

_OVERSAMPLE = 8


@dataclass(frozen=True, eq=False)
class Spectrum:
    """Singular values ``s`` of a block (maybe only the leading ones) and optional factors.

    ``u`` (rows x len(s)) and ``vt`` (len(s) x cols) are kept when computing them again would
    be expensive (randomized blocks); ``None`` means "recompute by exact SVD when needed".
    """

    s: np.ndarray
    fro2: float
    u: np.ndarray | None = None
    vt: np.ndarray | None = None


def tail_energy(s: np.ndarray, fro2: float) -> np.ndarray:
    """``t[k] = ||B||_F^2 - sum_{i<k} s_i^2`` for k = 0..len(s), clipped at 0."""
    kept = np.concatenate(([0.0], np.cumsum(s.astype(np.float64) ** 2)))
    return np.maximum(fro2 - kept, 0.0)


def exact_spectra(stack: np.ndarray) -> np.ndarray:
    """Singular values of each matrix in a ``(count, rows, cols)`` stack (LAPACK gesdd)."""
    try:
        return np.linalg.svd(stack, compute_uv=False)
    except np.linalg.LinAlgError:
        return np.stack([scipy.linalg.svdvals(b, lapack_driver="gesvd") for b in stack])


def _range_finder(b: np.ndarray, width: int, rng: np.random.Generator, power_iters: int) -> np.ndarray:
    q, _ = np.linalg.qr(b @ rng.standard_normal((b.shape[1], width)))
    for _ in range(power_iters):
        z, _ = np.linalg.qr(b.T @ q)
        q, _ = np.linalg.qr(b @ z)
    return q


def randomized_spectrum(
    b: np.ndarray,
    *,
    max_rank: int,
    target_tail2: float,
    rng: np.random.Generator,
    power_iters: int = 0,
    start_rank: int = 24,
) -> Spectrum:
    """Leading spectrum of a large block by a randomized range finder of growing width.

    The width doubles until the tail energy falls below ``target_tail2``, the width reaches
    ``max_rank``, or the observed decay predicts that ``target_tail2`` needs more than
    ``max_rank`` terms (then a low-rank form of this block cannot pay off).

    Returns:
        A Spectrum whose factors satisfy ``||b - u[:, :k] diag(s[:k]) vt[:k]||_F^2 ==
        tail_energy(s, fro2)[k]`` up to rounding.
    """
    fro2 = float(np.einsum("ij,ij->", b, b))
    rank = max(1, min(start_rank, max_rank))
    while True:
        width = min(rank + _OVERSAMPLE, min(b.shape))
        q = _range_finder(b, width, rng, power_iters)
        ut, s, vt = np.linalg.svd(q.T @ b, full_matrices=False)
        spectrum = Spectrum(s, fro2, q @ ut, vt)
        tails = tail_energy(s, fro2)
        if width >= min(b.shape) or rank >= max_rank or tails[min(rank, len(s))] <= target_tail2:
            return spectrum
        if _predicted_rank(tails, rank, target_tail2) > max_rank:
            return spectrum
        rank = min(2 * rank, max_rank)


def _predicted_rank(tails: np.ndarray, rank: int, target: float) -> float:
    """Rank at which the tail would reach ``target`` if it kept decaying geometrically."""
    half = max(rank // 2, 1)
    now, before = tails[rank], tails[half]
    if now <= target:
        return rank
    if now <= 0.0 or before <= now:
        return np.inf
    slope = (np.log(now) - np.log(before)) / (rank - half)
    return rank + (np.log(target) - np.log(now)) / slope


def split_factors(u: np.ndarray, s: np.ndarray, vt: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Balanced factors ``(U sqrt(S), sqrt(S) Vt)`` of the leading ``k`` terms.

    Splitting the singular values evenly keeps both factors in the same range, which matters
    when they are stored in float16.
    """
    root = np.sqrt(s[:k])
    return u[:, :k] * root, root[:, None] * vt[:k]
