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

Layout version 2: the storage kept
----------------------------------
``pack(hm, version=2)`` keeps every stored array (``storage.py``) as it is stored. A packed
H-matrix of version 2 is the same four arrays, with:

``data``
    1-D **uint8** array of bytes (a ``uint8`` ``data`` is what marks version 2).
``layout``
    int64 array of shape ``(num_rows, 8)`` with the columns
    ``KIND, ROW0, ROW1, COL0, COL1, RANK, FORMATS, BYTE_OFFSET`` (``LAYOUT_V2_COLUMNS``):

    - row 0 is the *shape row*: ``KIND`` 3 (``SHAPE_KIND``), ``ROW1 = m >= 1``,
      ``COL1 = n >= 1``, every other column 0;
    - every further row is one *term* of the product, ``KIND`` 1 (dense: ``RANK`` 0, one
      array ``A = D`` of ``rows x cols``) or 2 (one *tier* ``t`` of a low-rank block: ``RANK``
      its rank ``k_t >= 0``, arrays ``A = U_t`` of ``rows x k_t`` and ``B = Vt_t`` of
      ``k_t x cols``). Consecutive low-rank rows with the same four ranges are the tiers of one
      block, in rank order; the block is ``sum_t U_t @ Vt_t``.
    - ``FORMATS = A_FORMAT + 65536 * B_FORMAT`` (``B_FORMAT`` 0 for a dense block), each the
      format code of one array (below); ``BYTE_OFFSET`` is where ``A`` starts in ``data``, and
      ``B`` starts at the first multiple of ``ALIGN`` after ``A``'s payload and scales.

    Zero blocks have no row: the product starts from zero, and entries no block covers are
    zero (``HMatrix.nbytes`` counts one row per dense block and per tier, as here). The
    ranges lie in ``[0, m) x [0, n)``; ``pack`` never writes overlapping blocks, and the
    kernels and the reference add every term's product, whatever the ranges.
``row_perm``, ``col_perm``
    as in version 1.

An array ``A`` of shape ``(K, N)`` (``K`` its contraction axis: rows of ``D``, ``U_t`` or, for
``Vt_t``, the rank) is described by two integers:

``FORMAT = ELEM + 16 * SCALE_ELEM + 256 * GROUP``
    ``ELEM`` (``Elem``): 0 float32, 1 float16, 2 int8 (in ``[-127, 127]``), 3 int4. For the integer elements
    ``SCALE_ELEM`` is the scales' element (0 float32, 1 float16) and ``GROUP`` the rows per
    scale group (one of ``GROUP_SIZES``); for float elements both are 0.
``OFFSET``
    byte offset of the array in ``data``, a multiple of ``ALIGN``. The payload is the ``K*N``
    values row-major, little-endian: 4 or 2 bytes each for float32/float16, one byte each for
    int8 (two's complement), and for int4 ``ceil(K*N / 2)`` bytes with value ``i`` in the low
    nibble of byte ``i // 2`` when ``i`` is even and in the high nibble when odd (ONNX's int4
    order), as two's complement in ``[-8, 7]``. An integer array's scales, ``ceil(K / GROUP) x N``
    row-major, start at the next multiple of ``ALIGN`` after its payload.

An integer array stands for ``A[i, j] = fl(q[i, j] * scales[i // GROUP, j])``, rounded once to
the scale element (``storage.dequantize_groupwise``); ``unpack`` returns these exact values
(and the stored blocks only: a version-2 layout has no zero blocks to give back).
Version 2 holds float32 and float16 values only (the weight dtypes ``HMatMul`` runs), and only
``pack(hm, version=2)`` writes it; ``pack(hm)`` writes version 1 as before.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from .hmatrix import Block, BlockKind, HMatrix
from .storage import GROUP_SIZES, Storage, StoredArray, group_count, pack_int4, unpack_int4

__all__ = [
    "LAYOUT_VERSION",
    "LAYOUT_VERSIONS",
    "LAYOUT_COLUMNS",
    "LAYOUT_V2_COLUMNS",
    "KIND",
    "ROW0",
    "ROW1",
    "COL0",
    "COL1",
    "RANK",
    "OFFSET",
    "FORMATS",
    "BYTE_OFFSET",
    "SHAPE_KIND",
    "ALIGN",
    "Elem",
    "PackedHMatrix",
    "pack",
    "unpack",
    "validate_packed",
    "format_code",
    "decode_format",
    "ArrayLocation",
    "array_locations",
]

LAYOUT_VERSION = 1  # what ``pack(hm)`` writes
LAYOUT_VERSIONS = (1, 2)
LAYOUT_COLUMNS = ("kind", "row0", "row1", "col0", "col1", "rank", "offset")
KIND, ROW0, ROW1, COL0, COL1, RANK, OFFSET = range(7)
LAYOUT_V2_COLUMNS = ("kind", "row0", "row1", "col0", "col1", "rank", "formats", "byte_offset")
FORMATS, BYTE_OFFSET = 6, 7
SHAPE_KIND = 3  # KIND of row 0 of a version-2 layout
ALIGN = 16  # byte alignment of every array and of its scales in a version-2 ``data``


class Elem(enum.IntEnum):
    """Element type of a stored array or of its scales in layout version 2."""

    FLOAT32 = 0
    FLOAT16 = 1
    INT8 = 2
    INT4 = 3


_FLOAT_ELEMS = {np.dtype(np.float32): Elem.FLOAT32, np.dtype(np.float16): Elem.FLOAT16}
_ELEM_DTYPES = {Elem.FLOAT32: np.dtype("<f4"), Elem.FLOAT16: np.dtype("<f2")}


@dataclass(frozen=True, eq=False)
class PackedHMatrix:
    """The four arrays of the packed layout, plus the matrix shape for convenience."""

    data: np.ndarray
    layout: np.ndarray
    row_perm: np.ndarray
    col_perm: np.ndarray
    shape: tuple[int, int]

    @property
    def version(self) -> int:
        """2 when ``data`` is bytes (uint8), else 1."""
        return 2 if self.data.dtype == np.uint8 else 1


def _payload(block: Block) -> list[np.ndarray]:
    if block.kind == BlockKind.DENSE:
        return [block.dense.ravel()]
    if block.kind == BlockKind.LOWRANK:
        return [block.u.ravel(), block.vt.ravel()]
    return []


def _perms(hm: HMatrix) -> tuple[np.ndarray, np.ndarray]:
    row_perm = hm.row_perm if hm.row_perm is not None else np.zeros(0, np.int64)
    col_perm = hm.col_perm if hm.col_perm is not None else np.zeros(0, np.int64)
    return row_perm.astype(np.int64), col_perm.astype(np.int64)


def pack(hm: HMatrix, version: int = LAYOUT_VERSION) -> PackedHMatrix:
    """Pack an H-matrix into flat arrays: layout version 1 (in ``hm.dtype``) or 2 (storage kept).

    Raises:
        ValueError: version 1 and a block's dequantized values are not representable in
            ``hm.dtype``; version 2 and an array or scale is neither float32 nor float16; an
            unknown version.
    """
    if version == 2:
        return _pack_v2(hm)
    if version != 1:
        raise ValueError(f"layout version must be one of {LAYOUT_VERSIONS}, got {version!r}")
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
    row_perm, col_perm = _perms(hm)
    return PackedHMatrix(data, layout, row_perm, col_perm, hm.shape)


def format_code(elem: Elem, scale_elem: Elem = Elem.FLOAT32, group: int = 0) -> int:
    """``ELEM + 16 * SCALE_ELEM + 256 * GROUP`` (scale element and group only for integers)."""
    if elem in (Elem.FLOAT32, Elem.FLOAT16):
        return int(elem)
    return int(elem) + 16 * int(scale_elem) + 256 * int(group)


def decode_format(code: int) -> tuple[Elem, Elem, int]:
    """``(elem, scale_elem, group)`` of a format code.

    Raises:
        ValueError: the code is not one ``format_code`` makes.
    """
    code = int(code)
    elem, scale, group = code & 15, (code >> 4) & 15, code >> 8
    if code < 0 or elem > Elem.INT4:
        raise ValueError(f"unknown format {code} (element {elem})")
    if elem <= Elem.FLOAT16:
        if code != elem:
            raise ValueError(f"format {code}: a float element has no scale element or group")
        return Elem(elem), Elem.FLOAT32, 0
    if scale > Elem.FLOAT16 or group not in GROUP_SIZES:
        raise ValueError(f"format {code}: scale element {scale} must be 0 or 1 and group {group} one of {GROUP_SIZES}")
    return Elem(elem), Elem(scale), group


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _elem_nbytes(elem: Elem, size: int) -> int:
    return {Elem.FLOAT32: 4 * size, Elem.FLOAT16: 2 * size, Elem.INT8: size, Elem.INT4: (size + 1) // 2}[elem]


def _float_elem(dtype, what: str) -> Elem:
    try:
        return _FLOAT_ELEMS[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"layout v2 stores float32 and float16 only; {what} is {np.dtype(dtype).name}") from None


def _array_bytes(a: StoredArray) -> tuple[int, list[bytes]]:
    """The format code and the byte pieces (payload, then scales at the next ``ALIGN``) of one array."""
    if not a.storage.is_int:
        elem = _float_elem(a.values.dtype, "a stored array")
        return format_code(elem), [np.ascontiguousarray(a.values, _ELEM_DTYPES[elem]).tobytes()]
    scale_elem = _float_elem(a.scales.dtype, "a scale array")
    if a.storage == Storage.INT8:
        payload = np.ascontiguousarray(a.values).view(np.uint8).tobytes()
        elem = Elem.INT8
    else:
        payload = pack_int4(a.values).tobytes()
        elem = Elem.INT4
    scales = np.ascontiguousarray(a.scales, _ELEM_DTYPES[scale_elem]).tobytes()
    return format_code(elem, scale_elem, a.group), [payload, scales]


class _ByteWriter:
    """Appends pieces to a byte buffer, each at the next multiple of ``ALIGN``."""

    def __init__(self):
        self.chunks: list[bytes] = []
        self.size = 0

    def put(self, pieces: list[bytes]) -> int:
        """Appends the pieces, each at the next multiple of ``ALIGN``; returns where the first starts."""
        start = None
        for piece in pieces:
            pad = _align(self.size) - self.size
            self.chunks.append(b"\0" * pad)
            self.size += pad
            start = self.size if start is None else start
            self.chunks.append(piece)
            self.size += len(piece)
        return start

    def array(self) -> np.ndarray:
        return np.frombuffer(b"".join(self.chunks), dtype=np.uint8).copy()


def _pack_v2(hm: HMatrix) -> PackedHMatrix:
    out = _ByteWriter()
    m, n = hm.shape
    rows = [(SHAPE_KIND, 0, m, 0, n, 0, 0, 0)]

    def term(b: Block, rank: int, arrays) -> None:
        codes, offset = [], None
        for a in arrays:
            code, pieces = _array_bytes(a)
            start = out.put(pieces)
            offset = start if offset is None else offset
            codes.append(code)
        codes.append(0)
        rows.append((int(b.kind), b.r0, b.r1, b.c0, b.c1, rank, codes[0] + 65536 * codes[1], offset))

    for b in hm.blocks:
        if b.kind == BlockKind.DENSE:
            term(b, 0, b.storage)
        elif b.kind == BlockKind.LOWRANK:
            for u, vt in b.tiers:
                term(b, u.shape[1], (u, vt))
    layout = np.array(rows, dtype=np.int64).reshape(-1, len(LAYOUT_V2_COLUMNS))
    row_perm, col_perm = _perms(hm)
    return PackedHMatrix(out.array(), layout, row_perm, col_perm, hm.shape)


def _check_perm(perm: np.ndarray, size: int, name: str) -> None:
    if perm.ndim != 1 or perm.size not in (0, size):
        raise ValueError(f"{name} must be 1-D of length 0 or {size}, got shape {perm.shape}")
    if perm.size and not np.array_equal(np.sort(perm), np.arange(size)):
        raise ValueError(f"{name} is not a permutation of 0..{size - 1}")


def _check_perms(row_perm, col_perm, m: int, n: int) -> None:
    _check_perm(np.asarray(row_perm), m, "row_perm")
    _check_perm(np.asarray(col_perm), n, "col_perm")


def _check_ranges(i: int, r0: int, r1: int, c0: int, c1: int, m: int, n: int) -> None:
    if not (0 <= r0 < r1 <= m and 0 <= c0 < c1 <= n):
        raise ValueError(f"block {i}: bad ranges rows [{r0}, {r1}) cols [{c0}, {c1}) for shape ({m}, {n})")


def validate_packed(data: np.ndarray, layout: np.ndarray, row_perm: np.ndarray, col_perm: np.ndarray) -> tuple[int, int]:
    """Check a packed H-matrix (version 1, or 2 when ``data`` is uint8) and return its shape ``(m, n)``.

    Raises:
        ValueError: naming the first inconsistency (bad kind, range, format, offset,
            alignment or permutation).
    """
    data = np.asarray(data)
    if data.dtype == np.uint8:
        return _validate_v2(data, np.asarray(layout), row_perm, col_perm)
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
        _check_ranges(i, r0, r1, c0, c1, m, n)
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
    _check_perms(row_perm, col_perm, m, n)
    return m, n


def _array_extent(i: int, name: str, code: int, offset: int, k: int, n: int, data_size: int) -> int:
    """Checks one version-2 array of shape ``(k, n)`` at ``offset``; returns where its bytes end."""
    try:
        elem, scale_elem, group = decode_format(code)
    except ValueError as e:
        raise ValueError(f"block {i}: array {name}: {e}") from None
    if offset < 0 or offset % ALIGN:
        raise ValueError(f"block {i}: array {name} offset {offset} is not a non-negative multiple of {ALIGN}")
    end = offset + _elem_nbytes(elem, k * n)
    if group:
        end = _align(end) + _elem_nbytes(scale_elem, group_count(k, group) * n)
    if end > data_size:
        raise ValueError(f"block {i}: array {name} bytes [{offset}, {end}) outside data of {data_size} bytes")
    return end


def _check_int8(i: int, name: str, data: np.ndarray, code: int, offset: int, size: int) -> None:
    """An int8 array holds values in [-127, 127] (-128, byte 0x80, is not symmetric int8)."""
    if decode_format(code)[0] == Elem.INT8 and np.any(data[offset : offset + size] == 0x80):
        raise ValueError(f"block {i}: array {name} holds the int8 value -128 (symmetric int8 is [-127, 127])")


def _term_arrays(i: int, row, data: np.ndarray) -> list[tuple[str, int, int, int, int]]:
    """``(name, format, offset, K, N)`` of the arrays of a checked version-2 term row."""
    kind, r0, r1, c0, c1, rank, formats, offset = row
    rows, cols = r1 - r0, c1 - c0
    a_fmt, b_fmt = formats & 0xFFFF, formats >> 16
    if kind == BlockKind.DENSE:
        if rank or b_fmt:
            raise ValueError(f"block {i}: a dense block has rank 0 and no B format, got rank {rank}, B format {b_fmt}")
        arrays = [("D", a_fmt, offset, rows, cols)]
    else:
        if rank < 0:
            raise ValueError(f"block {i}: negative rank {rank}")
        arrays = [("U", a_fmt, offset, rows, rank), ("Vt", b_fmt, None, rank, cols)]
    checked, end = [], 0
    for name, code, off, k, nn in arrays:
        off = _align(end) if off is None else off
        end = _array_extent(i, name, code, off, k, nn, data.size)
        checked.append((name, code, off, k, nn))
    for name, code, off, k, nn in checked:
        _check_int8(i, name, data, code, off, k * nn)
    return checked


def _validate_v2(data: np.ndarray, layout: np.ndarray, row_perm, col_perm) -> tuple[int, int]:
    width = len(LAYOUT_V2_COLUMNS)
    if layout.ndim != 2 or layout.shape[1] != width:
        raise ValueError(f"layout v2 (uint8 data) must have shape (num_rows, {width}), got {layout.shape}")
    if data.ndim != 1:
        raise ValueError(f"data must be 1-D, got shape {data.shape}")
    if layout.shape[0] == 0:
        raise ValueError("layout v2 has no shape row")
    rows = layout.tolist()
    shape_row = rows[0]
    m, n = shape_row[ROW1], shape_row[COL1]
    others = (ROW0, COL0, RANK, FORMATS, BYTE_OFFSET)
    if shape_row[KIND] != SHAPE_KIND or m < 1 or n < 1 or any(shape_row[c] for c in others):
        raise ValueError(
            f"layout v2 row 0 must be the shape row [{SHAPE_KIND}, 0, m, 0, n, 0, 0, 0] with m, n >= 1, got {shape_row}"
        )
    for i, row in enumerate(rows[1:], start=1):
        kind, r0, r1, c0, c1 = row[:5]
        if kind not in (BlockKind.DENSE, BlockKind.LOWRANK):
            raise ValueError(f"block {i}: unknown kind {kind} (a version-2 term is 1 dense or 2 low-rank)")
        _check_ranges(i, r0, r1, c0, c1, m, n)
        if row[FORMATS] < 0:
            raise ValueError(f"block {i}: negative formats {row[FORMATS]}")
        _term_arrays(i, row, data)
    _check_perms(row_perm, col_perm, m, n)
    return m, n


def unpack(packed: PackedHMatrix, norm: float = float("nan"), certified_error: float = float("nan"), tol: float = float("nan")) -> HMatrix:
    """Rebuild an ``HMatrix`` from its packed arrays (the inverse of ``pack``, either version)."""
    data, layout = packed.data, packed.layout
    shape = validate_packed(data, layout, packed.row_perm, packed.col_perm)
    if packed.version == 2:
        dtype, blocks = _unpack_v2_blocks(data, layout)
    else:
        dtype, blocks = data.dtype, _unpack_v1_blocks(data, layout)
    row_perm = packed.row_perm if packed.row_perm.size else None
    col_perm = packed.col_perm if packed.col_perm.size else None
    return HMatrix(shape, dtype, tuple(blocks), norm, certified_error, tol, row_perm, col_perm)


@dataclass(frozen=True)
class ArrayLocation:
    """Where one array of a version-2 ``data`` lies: term row ``row`` of the layout, format
    code, byte offset, shape ``(K, N)`` and, for an integer array, where its scales start."""

    row: int
    format: int
    offset: int
    shape: tuple[int, int]
    scale_offset: int = 0


def array_locations(packed: PackedHMatrix) -> list[ArrayLocation]:
    """Every array of a version-2 packed H-matrix, in layout order (``A`` then ``B`` of each
    term row), the order in which ``unpack`` lists the blocks' ``storage``.

    Raises:
        ValueError: ``packed`` is not a valid version-2 layout.
    """
    if packed.version != 2:
        raise ValueError(f"array_locations reads layout version 2, got version {packed.version}")
    validate_packed(packed.data, packed.layout, packed.row_perm, packed.col_perm)
    out = []
    for i, row in enumerate(packed.layout.tolist()[1:], start=1):
        for _, code, offset, k, n in _term_arrays(i, row, packed.data):
            elem, _, group = decode_format(code)
            scales = _align(offset + _elem_nbytes(elem, k * n)) if group else 0
            out.append(ArrayLocation(i, code, offset, (k, n), scales))
    return out


def _unpack_v1_blocks(data: np.ndarray, layout: np.ndarray) -> list[Block]:
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
    return blocks


def _weight_dtype_v2(data: np.ndarray, layout: np.ndarray) -> np.dtype:
    """float16 when every array and scale of a version-2 layout is float16, else float32.

    Layout v2 does not record the weight's dtype; this choice only decides which arrays an
    ``unpack``ed H-matrix labels ``FLOAT`` rather than ``FP16``: the values are the same.
    """
    codes = [a[1] for i, row in enumerate(layout.tolist()[1:], start=1) for a in _term_arrays(i, row, data)]
    for code in codes:
        elem, scale_elem, group = decode_format(code)
        if elem == Elem.FLOAT32 or (group and scale_elem == Elem.FLOAT32):
            return np.dtype(np.float32)
    return np.dtype(np.float16) if codes else np.dtype(np.float32)


def _read_array(data: np.ndarray, code: int, offset: int, k: int, n: int, dtype: np.dtype) -> StoredArray:
    elem, scale_elem, group = decode_format(code)
    if elem in _ELEM_DTYPES:
        values = data[offset : offset + _elem_nbytes(elem, k * n)].view(_ELEM_DTYPES[elem]).reshape(k, n)
        values = values.astype(values.dtype.newbyteorder("="))
        storage = Storage.FLOAT if values.dtype == dtype else Storage.FP16
        return StoredArray(storage, values)
    payload = data[offset : offset + _elem_nbytes(elem, k * n)]
    q = payload.view(np.int8) if elem == Elem.INT8 else unpack_int4(payload, k * n)
    start = _align(offset + payload.size)
    scale_dtype = _ELEM_DTYPES[scale_elem]
    scales = data[start : start + _elem_nbytes(scale_elem, group_count(k, group) * n)].view(scale_dtype)
    scales = scales.astype(scale_dtype.newbyteorder("=")).reshape(group_count(k, group), n)
    storage = Storage.INT8 if elem == Elem.INT8 else Storage.INT4
    return StoredArray(storage, q.reshape(k, n).copy(), scales, group)


def _unpack_v2_blocks(data: np.ndarray, layout: np.ndarray) -> tuple[np.dtype, list[Block]]:
    dtype = _weight_dtype_v2(data, layout)
    blocks: list[Block] = []
    tiers: list[StoredArray] = []
    rows_list = layout.tolist()
    for i, row in enumerate(rows_list[1:], start=1):
        kind, r0, r1, c0, c1 = row[:5]
        arrays = tuple(_read_array(data, code, off, k, nn, dtype) for _, code, off, k, nn in _term_arrays(i, row, data))
        if kind == BlockKind.DENSE:
            blocks.append(Block(BlockKind.DENSE, r0, r1, c0, c1, storage=arrays))
            continue
        tiers += arrays
        following = rows_list[i + 1] if i + 1 < len(rows_list) else None
        if following is None or following[KIND] != BlockKind.LOWRANK or following[ROW0 : COL1 + 1] != [r0, r1, c0, c1]:
            blocks.append(Block(BlockKind.LOWRANK, r0, r1, c0, c1, storage=tuple(tiers)))
            tiers = []
    return dtype, blocks
