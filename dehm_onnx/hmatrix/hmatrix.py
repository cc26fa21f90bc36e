"""The H-matrix value type: a tiling of a weight matrix into zero, dense and low-rank blocks.

An ``HMatrix`` approximates a weight ``W`` of shape ``(m, n)`` used as ``Y = X @ W``.
Rows and columns may be reordered first: with ``Wp = W[row_perm][:, col_perm]``,
the blocks tile ``Wp`` exactly (every entry of ``[0, m) x [0, n)`` lies in one block).
A low-rank block stores ``U`` (rows x rank) and ``Vt`` (rank x cols) with ``B ≈ U @ Vt``.

Storage (see ``storage.py``): every array a block keeps is a ``StoredArray`` in the weight's
dtype (``FLOAT``), float16, int8 or int4 with groupwise scales along its contraction axis.
``Block.storage`` lists them: ``(D,)`` for a dense block; ``(U_0, Vt_0, U_1, Vt_1, ...)`` for a
low-rank block, whose rank is split into *tiers* ``t`` (consecutive singular vectors that share
one storage for ``U_t`` and one for ``Vt_t``), so that ``B = sum_t U_t @ Vt_t`` and
``X_b @ B = sum_t (X_b @ U_t) @ Vt_t``. A block of float arrays has one tier.

``Block.dense``, ``Block.u`` and ``Block.vt`` are the *dequantized* values (``u`` the tiers'
``U_t`` side by side, ``vt`` their ``Vt_t`` stacked), so code that knows nothing of storage
(``to_dense``, ``matmul``, the float emitters, layout v1) computes with exactly the values the
certified error was measured on. They have the dtype the dequantized values live in (the
weight's dtype by default; float16 for an FP16 array).

Bytes (``HMatrix.nbytes``) = payload + scales of every array + ``block_overhead`` bytes per
layout row (one row per dense block and per tier of a low-rank block; a zero block stores
nothing, so a layout need not list it: the product starts from zero) + 8 bytes per
permutation index. The weight left as it was (one dense FLOAT block, no permutation) counts as
exactly its dense bytes.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .storage import Storage, StoredArray

__all__ = ["BlockKind", "Block", "HMatrix", "INDEX_NBYTES"]

INDEX_NBYTES = 8  # bytes of one permutation index (int64 in the packed layout)


class BlockKind(enum.IntEnum):
    """Kind of a leaf block; the integer values are part of the packed layout."""

    ZERO = 0
    DENSE = 1
    LOWRANK = 2


@dataclass(frozen=True, eq=False)
class Block:
    """One leaf of the block tree, over permuted index ranges ``[r0, r1) x [c0, c1)``.

    Build it either from float arrays (``dense=`` for DENSE, ``u=`` and ``vt=`` for LOWRANK;
    they are stored as FLOAT) or from ``storage=`` (then ``dense``/``u``/``vt`` are filled in
    with the dequantized values). See the module docstring for the tier order of ``storage``.
    """

    kind: BlockKind
    r0: int
    r1: int
    c0: int
    c1: int
    dense: np.ndarray | None = None
    u: np.ndarray | None = None
    vt: np.ndarray | None = None
    storage: tuple[StoredArray, ...] = ()

    def __post_init__(self):
        if self.storage:
            if self.dense is not None or self.u is not None or self.vt is not None:
                raise ValueError("give a block either float arrays or storage, not both")
            self._fill_from_storage()
        elif self.kind == BlockKind.DENSE:
            object.__setattr__(self, "storage", (StoredArray.exact(self.dense),))
        elif self.kind == BlockKind.LOWRANK:
            object.__setattr__(self, "storage", (StoredArray.exact(self.u), StoredArray.exact(self.vt)))

    def _fill_from_storage(self) -> None:
        rows, cols = self.shape
        arrays = self.storage
        if self.kind == BlockKind.DENSE:
            if len(arrays) != 1 or arrays[0].shape != (rows, cols):
                raise ValueError(f"a dense {rows}x{cols} block stores one {rows}x{cols} array")
            object.__setattr__(self, "dense", arrays[0].dequantized())
        elif self.kind == BlockKind.LOWRANK:
            if len(arrays) % 2:
                raise ValueError("a low-rank block stores (U_t, Vt_t) pairs")
            for u, vt in zip(arrays[0::2], arrays[1::2]):
                if u.shape[0] != rows or vt.shape[1] != cols or u.shape[1] != vt.shape[0]:
                    raise ValueError(f"tier shapes {u.shape} @ {vt.shape} do not make a {rows}x{cols} block")
            dtype = np.result_type(*(a.dtype for a in arrays))
            object.__setattr__(self, "u", np.hstack([a.dequantized().astype(dtype, copy=False) for a in arrays[0::2]]))
            object.__setattr__(self, "vt", np.vstack([a.dequantized().astype(dtype, copy=False) for a in arrays[1::2]]))
        else:
            raise ValueError("a zero block stores nothing")

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
    def tiers(self) -> list[tuple[StoredArray, StoredArray]]:
        """``(U_t, Vt_t)`` pairs of a low-rank block (empty otherwise)."""
        if self.kind != BlockKind.LOWRANK:
            return []
        return list(zip(self.storage[0::2], self.storage[1::2]))

    @property
    def layout_rows(self) -> int:
        """Rows this block takes in a layout: one per tier, one for a dense block, none for zero."""
        if self.kind == BlockKind.ZERO:
            return 0
        return max(1, len(self.tiers))

    @property
    def params(self) -> int:
        """Number of stored values (scales not counted)."""
        return sum(a.values.size for a in self.storage)

    @property
    def nbytes(self) -> int:
        """Payload plus scale bytes of the stored arrays."""
        return sum(a.nbytes for a in self.storage)

    @property
    def is_float(self) -> bool:
        """Every array is stored in the weight's dtype (FLOAT)."""
        return all(a.storage == Storage.FLOAT for a in self.storage)

    @property
    def precision(self) -> str:
        """The storages of the arrays, e.g. ``int8`` or ``float+int4`` (``-`` for a zero block)."""
        kinds = sorted({a.storage for a in self.storage})
        return "+".join(k.label for k in kinds) or "-"

    def to_dense(self) -> np.ndarray:
        """The block as a dense array of its dequantized values (float64 for low-rank and zero blocks)."""
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
        dtype: the weight's dtype (what FLOAT storage means).
        blocks: leaves tiling the permuted matrix.
        row_perm, col_perm: index arrays (``None`` means identity).
        norm: ``||W||_F`` of the original weight (float64).
        certified_error: an upper bound on ``||W - W_H||_F`` that holds for the stored
            (rounded) factors.
        tol: the relative tolerance that was asked for.
        info: build statistics (seconds, candidates); not part of the value.
        block_overhead: bytes counted per layout row in ``nbytes``.
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
    block_overhead: int = 0

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
    def is_unchanged(self) -> bool:
        """One dense FLOAT block over the whole weight, no permutation: the weight as it was."""
        return (
            len(self.blocks) == 1
            and self.blocks[0].kind == BlockKind.DENSE
            and self.blocks[0].is_float
            and self.row_perm is None
            and self.col_perm is None
        )

    @property
    def payload_nbytes(self) -> int:
        """Bytes of the stored values of every block (scales not included)."""
        return sum(a.payload_nbytes for b in self.blocks for a in b.storage)

    @property
    def scale_nbytes(self) -> int:
        """Bytes of the groupwise scales of the integer arrays."""
        return sum(a.scale_nbytes for b in self.blocks for a in b.storage)

    @property
    def layout_nbytes(self) -> int:
        """``block_overhead`` bytes per layout row (per dense block and per low-rank tier)."""
        return self.block_overhead * sum(b.layout_rows for b in self.blocks)

    @property
    def index_nbytes(self) -> int:
        """Bytes of the permutations."""
        return INDEX_NBYTES * self.index_count

    @property
    def nbytes(self) -> int:
        """Payload + scales + layout + permutations; the dense bytes for an unchanged weight."""
        if self.is_unchanged:
            return self.dense_nbytes
        return self.payload_nbytes + self.scale_nbytes + self.layout_nbytes + self.index_nbytes

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the weight stored dense in its dtype."""
        return self.dense_params * np.dtype(self.dtype).itemsize

    @property
    def byte_ratio(self) -> float:
        """``nbytes / dense_nbytes`` (lower is better)."""
        return self.nbytes / self.dense_nbytes if self.dense_nbytes else 1.0

    def precision_counts(self) -> dict[str, int]:
        """Blocks by kind and storage, e.g. ``{"lowrank int8": 612, "dense fp16": 31}``."""
        counts = Counter(f"{b.kind.name.lower()} {b.precision}" for b in self.blocks if b.kind != BlockKind.ZERO)
        return dict(counts.most_common())

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
