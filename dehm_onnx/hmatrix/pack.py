"""The packed layout of an H-matrix: the one form that emitters and the C++ kernel read.

This module is the single definition of the layout (version ``LAYOUT_VERSION``). Everything
else (``dehm_onnx/ops/hmatmul.py``, ``custom_ops/include/dehm/layout.h``, the README) cites it.

A packed H-matrix for a weight of shape ``(m, n)`` is four arrays:

``data``
    1-D array in the weight's dtype holding every block payload back to back.
``layout``
    int64 array of shape ``(num_blocks, 7)``; row ``i`` describes block ``i`` with the
    columns ``KIND, ROW0, ROW1, COL0, COL1, RANK, OFFSET``:

    - ``KIND``: 0 zero (no payload), 1 dense, 2 low-rank (``BlockKind`` values).
    - ``[ROW0, ROW1) x [COL0, COL1)``: the block's index ranges in the *permuted* matrix
      ``Wp = W[row_perm][:, col_perm]``. The blocks tile ``[0, m) x [0, n)`` exactly, so
      ``m = max(ROW1)`` and ``n = max(COL1)``.
    - ``RANK``: the rank ``k`` of a low-rank block, 0 otherwise.
    - ``OFFSET``: start of the payload in ``data``. Dense: ``rows*cols`` values, row-major.
      Low-rank: ``U`` (``rows x k``, row-major) followed at ``OFFSET + rows*k`` by
      ``Vt`` (``k x cols``, row-major), so the block is ``U @ Vt``.
``row_perm``
    int64 array of length ``m``, or of length 0 for the identity. The input is gathered:
    ``Xp = X[..., row_perm]``.
``col_perm``
    int64 array of length ``n``, or of length 0 for the identity. The output is scattered:
    ``Y[..., col_perm[j]] = Yp[..., j]``.

The product is ``Yp = sum over blocks of Xp[..., ROW0:ROW1] @ B`` written into
``Yp[..., COL0:COL1]``, with low-rank blocks applied as ``(Xp_b @ U) @ Vt``.

Stored precisions and layout version 1
--------------------------------------
Version 1 holds every payload in the weight's dtype. ``pack`` writes a block's *dequantized*
values (``Block.dense``, ``Block.u``, ``Block.vt``; a tiered low-rank block as one ``U`` and
one ``Vt``), so an H-matrix with float16 or integer arrays packs into version 1 with exactly the
values its certified error was measured on, but without their byte savings. It refuses
(``ValueError``) when a dequantized value is not representable in the weight's dtype (a
float16 weight with float32 scales).

What a layout that keeps the storage must carry (``storage.py`` and ``hmatrix.py`` define it;
the version that does is not defined here): per stored array its storage (``Storage``), and for
integers its group size, its ``ceil(K / group) x N`` scales (in the scale dtype) and its int4 or
int8 values, with ``K`` the array's contraction axis (rows of ``D``, rows of ``U``, rows of
``Vt``); per low-rank block its tiers ``(U_t, Vt_t)`` in rank order. Zero blocks need no row
(``HMatrix.nbytes`` counts none): the product starts from zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .hmatrix import Block, BlockKind, HMatrix

__all__ = [
    "LAYOUT_VERSION",
    "LAYOUT_COLUMNS",
    "KIND",
    "ROW0",
    "ROW1",
    "COL0",
    "COL1",
    "RANK",
    "OFFSET",
    "PackedHMatrix",
    "pack",
    "unpack",
    "validate_packed",
]

LAYOUT_VERSION = 1
LAYOUT_COLUMNS = ("kind", "row0", "row1", "col0", "col1", "rank", "offset")
KIND, ROW0, ROW1, COL0, COL1, RANK, OFFSET = range(7)


@dataclass(frozen=True, eq=False)
class PackedHMatrix:
    """The four arrays of the packed layout, plus the matrix shape for convenience."""

    data: np.ndarray
    layout: np.ndarray
    row_perm: np.ndarray
    col_perm: np.ndarray
    shape: tuple[int, int]


def _payload(block: Block) -> list[np.ndarray]:
    if block.kind == BlockKind.DENSE:
        return [block.dense.ravel()]
    if block.kind == BlockKind.LOWRANK:
        return [block.u.ravel(), block.vt.ravel()]
    return []


def pack(hm: HMatrix) -> PackedHMatrix:
    """Pack an H-matrix into flat arrays in ``hm.dtype`` (layout version 1).

    Raises:
        ValueError: a block's dequantized values are not representable in ``hm.dtype``.
    """
    rows = []
    pieces = []
    offset = 0
    for b in hm.blocks:
        payload = _payload(b)
        size = sum(p.size for p in payload)
        rank = b.rank if b.kind == BlockKind.LOWRANK else 0
        rows.append((int(b.kind), b.r0, b.r1, b.c0, b.c1, rank, offset if size else 0))
        pieces.extend(payload)
        offset += size
    layout = np.array(rows, dtype=np.int64).reshape(-1, len(LAYOUT_COLUMNS))
    data = np.concatenate(pieces).astype(hm.dtype, copy=False) if pieces else np.zeros(0, hm.dtype)
    if not all(b.is_float for b in hm.blocks):
        exact = np.concatenate([p.astype(np.float64) for p in pieces]) if pieces else np.zeros(0)
        if not np.array_equal(data.astype(np.float64), exact):
            raise ValueError(
                f"layout v1 stores every block in {np.dtype(hm.dtype).name}, and this H-matrix's "
                "dequantized values are not all representable in it (scales wider than the weight's dtype)"
            )
    row_perm = hm.row_perm if hm.row_perm is not None else np.zeros(0, np.int64)
    col_perm = hm.col_perm if hm.col_perm is not None else np.zeros(0, np.int64)
    return PackedHMatrix(data, layout, row_perm.astype(np.int64), col_perm.astype(np.int64), hm.shape)


def _check_perm(perm: np.ndarray, size: int, name: str) -> None:
    if perm.ndim != 1 or perm.size not in (0, size):
        raise ValueError(f"{name} must be 1-D of length 0 or {size}, got shape {perm.shape}")
    if perm.size and not np.array_equal(np.sort(perm), np.arange(size)):
        raise ValueError(f"{name} is not a permutation of 0..{size - 1}")


def validate_packed(data: np.ndarray, layout: np.ndarray, row_perm: np.ndarray, col_perm: np.ndarray) -> tuple[int, int]:
    """Check a packed H-matrix for consistency and return its shape ``(m, n)``.

    Raises:
        ValueError: naming the first inconsistency (bad kind, range, offset or permutation).
    """
    layout = np.asarray(layout)
    if layout.ndim != 2 or layout.shape[1] != len(LAYOUT_COLUMNS):
        raise ValueError(f"layout must have shape (num_blocks, {len(LAYOUT_COLUMNS)}), got {layout.shape}")
    if data.ndim != 1:
        raise ValueError(f"data must be 1-D, got shape {data.shape}")
    if layout.shape[0] == 0:
        raise ValueError("layout has no blocks")
    m, n = int(layout[:, ROW1].max()), int(layout[:, COL1].max())
    area = 0
    for i, (kind, r0, r1, c0, c1, rank, off) in enumerate(layout.tolist()):
        if not (0 <= r0 < r1 <= m and 0 <= c0 < c1 <= n):
            raise ValueError(f"block {i}: bad ranges rows [{r0}, {r1}) cols [{c0}, {c1}) for shape ({m}, {n})")
        rows, cols = r1 - r0, c1 - c0
        if kind == BlockKind.ZERO:
            size = 0
        elif kind == BlockKind.DENSE:
            size = rows * cols
        elif kind == BlockKind.LOWRANK:
            if rank < 0:
                raise ValueError(f"block {i}: negative rank {rank}")
            size = rank * (rows + cols)
        else:
            raise ValueError(f"block {i}: unknown kind {kind}")
        if off < 0 or off + size > data.size:
            raise ValueError(f"block {i}: payload [{off}, {off + size}) outside data of size {data.size}")
        area += rows * cols
    if area != m * n:
        raise ValueError(f"blocks cover {area} entries, expected {m}x{n}={m * n}")
    _check_perm(np.asarray(row_perm), m, "row_perm")
    _check_perm(np.asarray(col_perm), n, "col_perm")
    return m, n


def unpack(packed: PackedHMatrix, norm: float = float("nan"), certified_error: float = float("nan"), tol: float = float("nan")) -> HMatrix:
    """Rebuild an ``HMatrix`` from its packed arrays (the inverse of ``pack``)."""
    data, layout = packed.data, packed.layout
    shape = validate_packed(data, layout, packed.row_perm, packed.col_perm)
    blocks = []
    for kind, r0, r1, c0, c1, rank, off in layout.tolist():
        rows, cols = r1 - r0, c1 - c0
        if kind == BlockKind.DENSE:
            blocks.append(Block(BlockKind.DENSE, r0, r1, c0, c1, dense=data[off : off + rows * cols].reshape(rows, cols)))
        elif kind == BlockKind.LOWRANK:
            u = data[off : off + rows * rank].reshape(rows, rank)
            vt = data[off + rows * rank : off + rank * (rows + cols)].reshape(rank, cols)
            blocks.append(Block(BlockKind.LOWRANK, r0, r1, c0, c1, u=u, vt=vt))
        else:
            blocks.append(Block(BlockKind.ZERO, r0, r1, c0, c1))
    row_perm = packed.row_perm if packed.row_perm.size else None
    col_perm = packed.col_perm if packed.col_perm.size else None
    return HMatrix(shape, data.dtype, tuple(blocks), norm, certified_error, tol, row_perm, col_perm)
