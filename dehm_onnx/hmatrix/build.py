"""compress(): the public entry point of the H-matrix engine (placeholder structure search)."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError, InvalidWeightError
from .hmatrix import Block, BlockKind, HMatrix

__all__ = ["compress"]

_FLOAT_DTYPES = (np.float16, np.float32, np.float64)


def _check_inputs(w, tol: float) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2:
        raise InvalidWeightError(f"weight must be 2-D, got {w.ndim}-D with shape {w.shape}")
    if w.dtype.type not in _FLOAT_DTYPES:
        raise InvalidWeightError(f"weight dtype must be float16, float32 or float64, got {w.dtype}")
    if w.size == 0:
        raise InvalidWeightError(f"weight is empty (shape {w.shape})")
    if not np.isfinite(w).all():
        raise InvalidWeightError(f"weight has {int((~np.isfinite(w)).sum())} NaN/Inf entries")
    if not (isinstance(tol, (int, float, np.floating)) and 0.0 < float(tol) < 1.0):
        raise ConfigError(f"tol must be in (0, 1), got {tol!r}")
    return w


def compress(w, tol: float, *, seed: int = 0) -> HMatrix:
    """Compress ``w`` (placeholder: best of dense and one global truncated SVD)."""
    w = _check_inputs(w, tol)
    w64 = w.astype(np.float64)
    m, n = w.shape
    norm = float(np.linalg.norm(w64))
    dense = HMatrix((m, n), w.dtype, (Block(BlockKind.DENSE, 0, m, 0, n, dense=w.copy()),), norm, 0.0, float(tol))
    if norm == 0.0:
        return HMatrix((m, n), w.dtype, (Block(BlockKind.ZERO, 0, m, 0, n),), 0.0, 0.0, float(tol))
    u, s, vt = np.linalg.svd(w64, full_matrices=False)
    tail = np.sqrt(np.cumsum((s**2)[::-1])[::-1])
    budget = tol * norm
    k = int(np.argmax(np.append(tail, 0.0) <= budget))
    if k * (m + n) >= m * n:
        return dense
    uk = (u[:, :k] * s[:k]).astype(w.dtype)
    vk = vt[:k].astype(w.dtype)
    err = float(np.linalg.norm(w64 - uk.astype(np.float64) @ vk.astype(np.float64)))
    if err > budget:
        return dense
    block = Block(BlockKind.LOWRANK, 0, m, 0, n, u=uk, vt=vk)
    return HMatrix((m, n), w.dtype, (block,), norm, err, float(tol))
