"""The H-matrix value type: a tiling of a weight matrix into zero, dense and low-rank blocks.

An ``HMatrix`` approximates a weight ``W`` of shape ``(m, n)`` used as ``Y = X @ W``.
Rows and columns may be reordered first: with ``Wp = W[row_perm][:, col_perm]``,
the blocks tile ``Wp`` exactly (every entry of ``[0, m) x [0, n)`` lies in one block).
A low-rank block stores ``U`` (rows x rank) and ``Vt`` (rank x cols) with ``B ≈ U @ Vt``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

__all__ = ["BlockKind", "Block", "HMatrix"]


class BlockKind(enum.IntEnum):
    """Kind of a leaf block; the integer values are part of the packed layout."""

    ZERO = 0
    DENSE = 1
    LOWRANK = 2


@dataclass(frozen=True, eq=False)
class Block:
    """One leaf of the block tree, over permuted index ranges ``[r0, r1) x [c0, c1)``.

    ``dense`` is set for DENSE blocks; ``u`` and ``vt`` for LOWRANK blocks.
    """

    kind: BlockKind
    r0: int
    r1: int
    c0: int
    c1: int
    dense: np.ndarray | None = None
    u: np.ndarray | None = None
    vt: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.r1 - self.r0, self.c1 - self.c0)

    @property
    def rank(self) -> int:
        """Rank of a low-rank block; full size for dense; 0 for zero blocks."""
        if self.kind == BlockKind.LOWRANK:
            return int(self.u.shape[1])
        if self.kind == BlockKind.DENSE:
            return min(self.shape)
        return 0

    @property
    def params(self) -> int:
        """Number of stored scalars."""
        rows, cols = self.shape
        if self.kind == BlockKind.LOWRANK:
            return self.rank * (rows + cols)
        if self.kind == BlockKind.DENSE:
            return rows * cols
        return 0

    def to_dense(self) -> np.ndarray:
        """The block as a dense array in the stored dtype (float64 for zero blocks of unknown dtype)."""
        if self.kind == BlockKind.DENSE:
            return self.dense
        if self.kind == BlockKind.LOWRANK:
            return self.u.astype(np.float64) @ self.vt.astype(np.float64)
        return np.zeros(self.shape)


@dataclass(frozen=True, eq=False)
class HMatrix:
    """A compressed weight with its certified error.

    Attributes:
        shape: ``(m, n)`` of the original weight.
        dtype: stored dtype of the factors (the weight's dtype).
        blocks: leaves tiling the permuted matrix.
        row_perm, col_perm: index arrays (``None`` means identity).
        norm: ``||W||_F`` of the original weight (float64).
        certified_error: an upper bound on ``||W - W_H||_F`` that holds for the stored
            (rounded) factors.
        tol: the relative tolerance that was asked for.
    """

    shape: tuple[int, int]
    dtype: np.dtype
    blocks: tuple[Block, ...]
    norm: float
    certified_error: float
    tol: float
    row_perm: np.ndarray | None = None
    col_perm: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    @property
    def params(self) -> int:
        """Stored scalars in the blocks (permutations not counted; see ``index_count``)."""
        return sum(b.params for b in self.blocks)

    @property
    def index_count(self) -> int:
        """Stored integers of the permutations."""
        return sum(p.size for p in (self.row_perm, self.col_perm) if p is not None)

    @property
    def dense_params(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def ratio(self) -> float:
        """Stored parameters / dense parameters (lower is better; 1.0 for an empty matrix)."""
        return self.params / self.dense_params if self.dense_params else 1.0

    @property
    def rel_certified_error(self) -> float:
        """``certified_error / ||W||_F`` (0 for an all-zero weight)."""
        return self.certified_error / self.norm if self.norm > 0 else 0.0

    def counts(self) -> dict[str, int]:
        """Number of blocks of each kind, keyed by lower-case kind name."""
        out = {k.name.lower(): 0 for k in BlockKind}
        for b in self.blocks:
            out[b.kind.name.lower()] += 1
        return out

    @property
    def max_rank(self) -> int:
        ranks = [b.rank for b in self.blocks if b.kind == BlockKind.LOWRANK]
        return max(ranks, default=0)

    def to_dense(self, dtype=np.float64) -> np.ndarray:
        """Reconstruct ``W_H`` in the original (unpermuted) row and column order."""
        m, n = self.shape
        wp = np.zeros((m, n), dtype=np.float64)
        for b in self.blocks:
            if b.kind != BlockKind.ZERO:
                wp[b.r0 : b.r1, b.c0 : b.c1] = b.to_dense()
        w = np.empty_like(wp)
        rows = self.row_perm if self.row_perm is not None else np.arange(m)
        cols = self.col_perm if self.col_perm is not None else np.arange(n)
        w[np.ix_(rows, cols)] = wp
        return w.astype(dtype, copy=False)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """Reference product ``X @ W_H`` for ``X`` of shape ``(..., m)``, computed block by block.

        Low-rank blocks are applied as ``(X_b @ U) @ Vt``. The result has X's dtype when
        X is floating point, computed in float64.
        """
        x = np.asarray(x)
        m, n = self.shape
        if x.ndim < 1 or x.shape[-1] != m:
            raise ValueError(f"X must have last dimension {m}, got shape {x.shape}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, m).astype(np.float64)
        if self.row_perm is not None:
            x2 = x2[:, self.row_perm]
        yp = np.zeros((x2.shape[0], n), dtype=np.float64)
        for b in self.blocks:
            xb = x2[:, b.r0 : b.r1]
            if b.kind == BlockKind.DENSE:
                yp[:, b.c0 : b.c1] += xb @ b.dense.astype(np.float64)
            elif b.kind == BlockKind.LOWRANK:
                yp[:, b.c0 : b.c1] += (xb @ b.u.astype(np.float64)) @ b.vt.astype(np.float64)
        if self.col_perm is not None:
            y = np.empty_like(yp)
            y[:, self.col_perm] = yp
        else:
            y = yp
        out_dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64
        return y.reshape(*lead, n).astype(out_dtype, copy=False)
