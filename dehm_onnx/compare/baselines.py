"""The two certified baselines of ``compare``: global truncated SVD and magnitude pruning.

Both meet the same weight bound as the H-matrix, ``||W - W~||_F <= tol * ||W||_F``
(relative Frobenius), measured in float64 on the *stored* (rounded) values, so the three
methods are compared at equal certified error:

* ``truncated_svd``: ``W ~ U @ Vt`` with the smallest rank ``k`` whose tail
  ``sqrt(sum_{i>k} s_i^2)`` fits the budget (Eckart-Young: no rank-k matrix does better);
  the rank grows until the bound also holds after rounding the factors to W's dtype.
  Stored: ``k * (m + n)`` scalars.
* ``magnitude_prune``: zero the smallest-magnitude entries while the sum of their squares
  fits ``tol^2 ||W||_F^2`` (no other choice of zeroed entries keeps fewer nonzeros).
  ONNX has no sparse MatMul, so the pruned weight is stored dense; the parameters a sparse
  format would need are ``csr_params``: one value and one column index per nonzero plus
  ``rows + 1`` row pointers (CSR), every integer counted as one parameter.

Pure numpy: no onnx import.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, InvalidWeightError

__all__ = ["SvdFactors", "PrunedWeight", "truncated_svd", "magnitude_prune", "csr_params"]


@dataclass(frozen=True)
class SvdFactors:
    """``W ~ u @ vt`` with ``rel_error = ||W - u @ vt||_F / ||W||_F`` (stored dtype, float64 sum)."""

    u: np.ndarray
    vt: np.ndarray
    rel_error: float

    @property
    def rank(self) -> int:
        return int(self.u.shape[1])

    @property
    def params(self) -> int:
        """Stored scalars ``rank * (m + n)``."""
        return int(self.u.size + self.vt.size)


@dataclass(frozen=True)
class PrunedWeight:
    """The pruned weight (same shape and dtype as W) and its relative Frobenius error."""

    weight: np.ndarray
    rel_error: float

    @property
    def nonzeros(self) -> int:
        return int(np.count_nonzero(self.weight))

    @property
    def params(self) -> int:
        """Sparse (CSR) storage, see ``csr_params``."""
        return csr_params(self.weight)


def _check(w: np.ndarray, tol: float) -> np.ndarray:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0.0 < float(tol) < 1.0:
        raise ConfigError(f"tol must be in (0, 1), got {tol!r}")
    w = np.asarray(w)
    if w.ndim != 2 or w.size == 0:
        raise InvalidWeightError(f"weight must be a non-empty 2-D array, got shape {w.shape}")
    if w.dtype.kind != "f":
        raise InvalidWeightError(f"weight must be floating point, got {w.dtype}")
    if not np.all(np.isfinite(w)):
        raise InvalidWeightError("weight has NaN/Inf entries")
    return w


def _rel_error(w64: np.ndarray, approx: np.ndarray, norm: float) -> float:
    return float(np.linalg.norm(w64 - approx) / norm) if norm > 0 else 0.0


def truncated_svd(w: np.ndarray, tol: float, max_rank: int | None = None) -> SvdFactors | None:
    """The lowest-rank ``U @ Vt`` with ``||W - U @ Vt||_F <= tol * ||W||_F`` for the rounded factors.

    Returns ``None`` when that rank exceeds ``max_rank`` (e.g. the rank beyond which the
    factors store more than W itself), without forming the factors.

    Raises:
        ConfigError: tol outside (0, 1).
        InvalidWeightError: W is not a finite, non-empty, floating 2-D array.
    """
    w = _check(w, tol)
    w64 = w.astype(np.float64)
    norm = float(np.linalg.norm(w64))
    u, s, vt = np.linalg.svd(w64, full_matrices=False)
    # tails[k] = ||W - W_k||_F, the error of keeping the first k singular values.
    tails = np.sqrt(np.maximum(np.cumsum((s**2)[::-1])[::-1], 0.0))
    tails = np.append(tails, 0.0)
    budget = tol * norm
    rank = int(np.argmax(tails <= budget))
    while True:
        if max_rank is not None and rank > max_rank:
            return None
        us = (u[:, :rank] * s[:rank]).astype(w.dtype)
        vk = vt[:rank].astype(w.dtype)
        error = _rel_error(w64, us.astype(np.float64) @ vk.astype(np.float64), norm)
        if error <= tol or rank == len(s):
            return SvdFactors(us, vk, error)
        rank += 1


def magnitude_prune(w: np.ndarray, tol: float) -> PrunedWeight:
    """Zero the most small entries of W such that ``||W - W_p||_F <= tol * ||W||_F``.

    Raises:
        ConfigError: tol outside (0, 1).
        InvalidWeightError: W is not a finite, non-empty, floating 2-D array.
    """
    w = _check(w, tol)
    w64 = w.astype(np.float64)
    norm = float(np.linalg.norm(w64))
    flat = np.abs(w64).ravel()
    order = np.argsort(flat, kind="stable")
    dropped = np.cumsum(flat[order] ** 2)
    count = int(np.searchsorted(dropped, (tol * norm) ** 2, side="right"))
    pruned = w.copy().ravel()
    pruned[order[:count]] = 0
    pruned = pruned.reshape(w.shape)
    return PrunedWeight(pruned, _rel_error(w64, pruned.astype(np.float64), norm))


def csr_params(w: np.ndarray) -> int:
    """Scalars a CSR copy of ``w`` stores: ``2 * nonzeros + rows + 1``."""
    return 2 * int(np.count_nonzero(w)) + int(w.shape[0]) + 1
