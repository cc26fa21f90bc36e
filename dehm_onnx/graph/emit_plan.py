"""Plans of the standard-op emission: the stacked tensors of a compressed weight and the batched steps over them.

An ``HMatrix`` (``W_H``, blocks over the permuted matrix ``Wp = W[row_perm][:, col_perm]``) is
a sum of *terms*: a dense block ``D`` (``Y[:, c] += X[:, r] @ D``) or one tier of a low-rank
block (``Y[:, c] += (X[:, r] @ U_t) @ Vt_t``). Emitting one node per term makes thousands of
nodes, each costing a few µs in onnxruntime. The *batched* plan built here computes every term
with a number of nodes that grows with the number of distinct block sizes instead, in the
"K-major" layout where the activation is transposed once, ``Xt = Xᵀ`` (``m x N``)::

    Xt                     = Transpose(X)                               (m, N)
    tiles_s                = Reshape(Xt, [R, S, -1])  or Gather rows    (R, S, N)  one per row size
    T_s                    = MatMul(Ustack_s, tiles_s)                  (R, K, N)  every U of that size
    Yt_b                   = MatMul(Vstack_b, Reshape(Gather(Concat(T..), idx), [C, J, -1]))
                                                                        (C, c, N)  one per column band
    Y                      = Transpose(Sum(Reshape(Yt_b, [n, -1]) ...))  (N, n)

- A *left group* holds the low-rank terms whose row ranges have one size (one level of the
  block tree, sizes within 1 for odd dimensions). Its row ranges are the *tiles*: ``tiles_s``
  is a reshape of ``Xt`` when they are the uniform grid ``[i*S, (i+1)*S)`` (a gather of whole
  tiles when some are absent), else a gather of rows padded to the largest tile. Tile ``i``'s
  slab of ``Ustack`` (``K x S``) holds the ``Uᵀ`` of every term over those rows, one after the
  other, so ``T[i]`` holds their products ``(X_b U)ᵀ``. Terms of one storage class sit together;
  ``K`` is the widest tile (shorter ones are zero-padded).
- A *right band* takes the low-rank terms whose column ranges have some consecutive sizes, plus
  dense terms. Its column *tiles* are the finest of them (a uniform grid when aligned); a wider
  term is cut into tile-wide chunks (its ``T`` rows are gathered once per chunk). Tile ``j`` of
  ``Vstack`` (``c x J``) holds, side by side, ``(Vt chunk)ᵀ`` and ``(D chunk)ᵀ`` of the terms over
  those columns; one ``Gather`` of the concatenated sources (``T`` rows, or rows of ``Xt`` for
  dense terms) brings the matching rows, so one batched MatMul computes every tile.
- A *dense group* takes dense blocks of one shape on a uniform grid: ``Xt`` reshaped into
  row tiles, whole tiles gathered per column tile (or none, for the block diagonal).

Storage: a stack is the concatenation of one *part* per storage class, each kept in its own
storage in the file and turned into the activation dtype by ops that depend only on constants,
so onnxruntime folds them when the session is created (the file keeps the small form, memory
holds the float stack): ``float`` as is, ``fp16`` by a ``Cast``, ``int8``/``int4`` as
``Cast(q) * scales`` over groups of the contraction axis (``q`` shaped ``(..., G, g)``, scales
``(..., G, 1)``), exactly ``DequantizeLinear``'s values. Zero padding costs bytes in the
part's own storage. ``Plan.nbytes`` counts every tensor the plan stores.

This module is numpy only: ``emit_batched`` turns a plan into nodes, ``run_plan`` executes
one in numpy.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from ..hmatrix import BlockKind, HMatrix, Storage, StoredArray
from ..hmatrix.storage import group_count

__all__ = [
    "Term",
    "terms_of",
    "Tensor",
    "Part",
    "Stack",
    "Tiles",
    "LeftGroup",
    "RightGroup",
    "Plan",
    "PlanOptions",
    "size_classes",
    "build_batched",
    "BatchedBuilder",
    "run_plan",
    "INDEX_DTYPE",
    "narrow_index_dtype",
]

# Gather indices are stored as int32 (half the bytes of int64; onnxruntime takes both).
INDEX_DTYPE = np.dtype(np.int32)
# Index arrays at least this long are stored narrower (uint8/uint16) and widened by a Cast
# folded at load: below it the Cast node costs more bytes than it saves.
NARROW_INDEX_MIN = 16


def narrow_index_dtype(values: np.ndarray) -> np.dtype:
    """The dtype gather indices ``values`` are stored in: uint8 or uint16 when they fit and
    there are at least ``NARROW_INDEX_MIN`` of them, else ``INDEX_DTYPE``."""
    values = np.asarray(values)
    if values.size < NARROW_INDEX_MIN or values.min() < 0:
        return INDEX_DTYPE
    top = int(values.max())
    return np.dtype(np.uint8) if top <= 0xFF else np.dtype(np.uint16) if top <= 0xFFFF else INDEX_DTYPE
_CLASS_ORDER = (Storage.FLOAT, Storage.FP16, Storage.INT8, Storage.INT4)


# ----------------------------------------------------------------------------- terms


@dataclass(frozen=True, eq=False)
class Term:
    """One product of the H-matrix: a dense block, or one tier of a low-rank block.

    ``a`` is the left array (``D`` of a dense term, ``U_t`` of a low-rank one), ``b`` the right
    array (``Vt_t``; ``None`` for a dense term). Both are in the engine's orientation (rows along
    the contraction axis).
    """

    index: int
    block: int
    tier: int
    kind: BlockKind
    r0: int
    r1: int
    c0: int
    c1: int
    a: StoredArray
    b: StoredArray | None = None

    @property
    def rows(self) -> int:
        return self.r1 - self.r0

    @property
    def cols(self) -> int:
        return self.c1 - self.c0

    @property
    def width(self) -> int:
        """Length of the right product's contraction: the rank, or a dense block's rows."""
        return self.b.shape[0] if self.kind == BlockKind.LOWRANK else self.rows

    @property
    def right(self) -> StoredArray:
        """The array multiplied on the right side (``Vt_t``, or ``D``)."""
        return self.b if self.kind == BlockKind.LOWRANK else self.a


def terms_of(hm: HMatrix) -> list[Term]:
    """Every nonzero product of ``hm``, in block order (rank-0 tiers and zero blocks give none)."""
    terms: list[Term] = []
    for i, blk in enumerate(hm.blocks):
        if blk.kind == BlockKind.DENSE:
            terms.append(Term(len(terms), i, 0, BlockKind.DENSE, blk.r0, blk.r1, blk.c0, blk.c1, blk.storage[0]))
        elif blk.kind == BlockKind.LOWRANK:
            for t, (u, vt) in enumerate(blk.tiers):
                if u.shape[1] > 0:
                    terms.append(Term(len(terms), i, t, BlockKind.LOWRANK, blk.r0, blk.r1, blk.c0, blk.c1, u, vt))
    return terms


# ----------------------------------------------------------------------------- tensors


@dataclass(eq=False)
class Tensor:
    """A constant the plan stores (an initializer in ``ops`` mode, a node input in ``function``).

    ``role`` is ``payload`` (factor values: float, float16, or integers held in int8, written as
    ONNX INT4 when ``storage`` is INT4), ``scales``, ``index`` (gather indices) or ``shape``
    (small int64 shapes; these become ``Constant`` nodes inside a function body).
    """

    name: str
    values: np.ndarray
    role: str
    storage: Storage | None = None

    @property
    def nbytes(self) -> int:
        if self.storage == Storage.INT4:
            return (self.values.size + 1) // 2
        if self.role == "index":
            return self.values.size * narrow_index_dtype(self.values).itemsize
        return int(self.values.nbytes)


@dataclass(eq=False)
class Part:
    """One storage class of a stack.

    ``payload`` holds the values: for float and float16, already in the stack's layout; for
    integers shaped ``(..., G, g)`` with ``scales`` ``(..., G, 1)`` along the contraction axis,
    dequantized as ``Reshape(Cast(payload) * scales, deq_shape)``, then cut to ``length`` along
    the last axis when padded (``length`` 0 = no cut).
    """

    storage: Storage
    payload: Tensor
    scales: Tensor | None = None
    deq_shape: tuple[int, ...] = ()
    length: int = 0


@dataclass(eq=False)
class Stack:
    """A constant 3-D factor stack, the concatenation of its parts along ``axis`` (then
    reshaped to ``shape`` when ``reshape`` is set).

    ``vectors`` says where each stored vector came from, ``{(batch, slot): (array, k, start,
    stop)}``: in a left stack (``axis`` 1, ``(B, O, L)``) slot ``(b, o)`` is ``[b, o, :]`` and
    holds column ``k`` of ``array`` (rows ``start:stop``); in a right stack (``axis`` 2,
    ``(C, c, J)``) slot ``(j, p)`` is ``[j, :, p]`` and holds row ``k`` of ``array``, columns
    ``start:stop``. Every other slot is zero. A function body rebuilds the stack from it.
    """

    parts: list[Part]
    axis: int
    shape: tuple[int, int, int]
    reshape: bool = False
    vectors: dict = field(default_factory=dict)


@dataclass(eq=False)
class Tiles:
    """How ``Xt`` (``m x N``) becomes ``(R, S, N)`` row tiles.

    ``grid``: reshape into ``m // S`` tiles of ``S`` rows, then (``slabs``, when not every tile
    is used in order) gather whole tiles. Otherwise ``rows`` gathers ``R * S`` rows (padding
    rows read row 0 and meet zero weights).
    """

    key: str
    R: int
    S: int
    grid: bool
    slabs: Tensor | None = None
    rows: Tensor | None = None


@dataclass(eq=False)
class LeftGroup:
    """``T = Ustack @ tiles`` for the low-rank terms of one row size: ``(R, K, N)``."""

    key: str
    tiles: Tiles
    stack: Stack
    terms: list[int] = field(default_factory=list)


@dataclass(eq=False)
class RightGroup:
    """``Yt_part = Vstack @ gathered`` over ``C`` column tiles of ``c`` columns.

    ``sources`` lists what the rows are gathered from, in concatenation order: ``"x"`` for
    ``Xt`` itself or the key of a left group (its ``T`` flattened to ``(R*K, N)``). ``gather``
    holds the ``C * J`` row indices into that concatenation; for a dense group ``slabs`` holds
    the ``C * P`` row-tile indices into ``tiles`` instead (``None``: the tiles in order).
    ``placement`` (``None`` when the tiles are the uniform grid over ``[0, n)``) gathers the
    ``n`` output rows out of ``(C * c)`` rows plus one zero row appended at the end.
    """

    key: str
    C: int
    c: int
    J: int
    stack: Stack
    sources: list[str] = field(default_factory=list)
    gather: Tensor | None = None
    tiles: Tiles | None = None
    slabs: Tensor | None = None
    placement: Tensor | None = None
    terms: list[int] = field(default_factory=list)


@dataclass(eq=False)
class Plan:
    """A batched emission of one H-matrix: row/column permutations, tilings, groups, tensors."""

    shape: tuple[int, int]
    dtype: np.dtype
    row_perm: Tensor | None
    col_inverse: Tensor | None
    tilings: list[Tiles]
    lefts: list[LeftGroup]
    rights: list[RightGroup]
    tensors: list[Tensor]
    options: "PlanOptions | None" = None

    @property
    def nbytes(self) -> int:
        """Bytes of every stored tensor (payloads, scales, indices, shapes)."""
        return sum(t.nbytes for t in self.tensors)

    def tensors_by_role(self, role: str) -> list[Tensor]:
        return [t for t in self.tensors if t.role == role]


@dataclass(frozen=True)
class PlanOptions:
    """Choices of a batched plan the cost model makes.

    ``bands``: partition of the low-rank column size classes (ascending) into consecutive runs,
    as the number of classes in each run (``None``: one band per class). ``dense_groups``: put
    dense blocks on a uniform grid into reshape/slab groups (else they join the bands).
    """

    bands: tuple[int, ...] | None = None
    dense_groups: bool = True


# ----------------------------------------------------------------------------- helpers


def size_classes(ranges) -> list[list[tuple[int, int]]]:
    """Group distinct index ranges into classes of one size (sizes within 1), ascending.

    Ranges of one class never overlap (ranges of one tree level do not); a range that would
    overlap one already in the class starts a class of its own.
    """
    classes: list[list[tuple[int, int]]] = []
    sizes: list[int] = []
    for r in sorted(set(ranges), key=lambda r: (r[1] - r[0], r[0])):
        size = r[1] - r[0]
        for cls, low in zip(classes, sizes):
            if size - low <= 1 and all(r[1] <= a or b <= r[0] for a, b in cls):
                cls.append(r)
                break
        else:
            classes.append([r])
            sizes.append(size)
    order = sorted(range(len(classes)), key=lambda i: sizes[i])
    return [sorted(classes[i]) for i in order]


def _grid_width(ranges, total: int) -> int:
    """``S`` when every range is ``[i*S, (i+1)*S)`` and ``S`` divides ``total``, else 0."""
    size = max(b - a for a, b in ranges)
    if size == 0 or total % size:
        return 0
    return size if all(b - a == size and a % size == 0 for a, b in ranges) else 0


def _storage_class(arr: StoredArray) -> Storage:
    return arr.storage


def _effective_group(arr: StoredArray, length: int) -> int:
    """Rows per scale of an integer array whose contraction is ``length`` rows long."""
    return min(arr.group, length)


class _Names:
    def __init__(self):
        self.tensors: list[Tensor] = []
        self._count = 0

    def add(self, stem: str, values: np.ndarray, role: str, storage: Storage | None = None) -> Tensor:
        self._count += 1
        tensor = Tensor(f"{stem}{self._count}", np.ascontiguousarray(values), role, storage)
        self.tensors.append(tensor)
        return tensor

    def index(self, stem: str, values) -> Tensor:
        return self.add(stem, np.asarray(values, dtype=INDEX_DTYPE), "index")


def _part_values(storage: Storage, dtype) -> np.dtype:
    if storage == Storage.FLOAT:
        return np.dtype(dtype)
    if storage == Storage.FP16:
        return np.dtype(np.float16)
    return np.dtype(np.int8)


# ----------------------------------------------------------------------------- stacks


@dataclass(eq=False)
class _Vec:
    """One vector of a stored array: a column of ``U_t`` (left) or a row of a ``Vt_t``/``D``
    chunk (right), with its storage; integers keep their per-group scales."""

    key: object
    storage: Storage
    values: np.ndarray
    scales: np.ndarray | None = None
    group: int = 0

    def dequantized(self) -> np.ndarray:
        if self.scales is None:
            return self.values
        expanded = np.repeat(self.scales, self.group)[: self.values.size]
        return self.values.astype(self.scales.dtype) * expanded


def _columns(arr: StoredArray, key) -> list[_Vec]:
    scales = arr.scales
    return [_Vec((key, k), arr.storage, arr.values[:, k], None if scales is None else scales[:, k], arr.group)
            for k in range(arr.shape[1])]


# A slot of a storage holds a vector of these storages exactly (integers widen to int8 with
# their own scales; anything to the float dtype when its values are representable there).
_HOLDS = {
    Storage.FLOAT: (Storage.FLOAT, Storage.FP16, Storage.INT8, Storage.INT4),
    Storage.FP16: (Storage.FP16,),
    Storage.INT8: (Storage.INT8, Storage.INT4),
    Storage.INT4: (Storage.INT4,),
}


def _exact_in(vec: _Vec, dtype) -> bool:
    values = vec.dequantized()
    with np.errstate(over="ignore"):
        return bool(np.array_equal(values.astype(dtype).astype(values.dtype), values))


def _place(per_tile: list, counts: list, widths: dict, spill: dict, order) -> tuple[dict, dict, int]:
    """Put each tile's vectors into the slots of ``widths`` (storages laid out in ``order``)
    as ``_assign`` plans them. Returns per storage ``{(tile, slot): vector}``, per vector key
    ``(tile, position)`` and the total width."""
    offsets, position = {}, 0
    for storage in order:
        if storage in widths:
            offsets[storage] = position
            position += widths[storage]
    placed = {s: {} for s in widths}
    where = {}
    for tile, vectors in enumerate(per_tile):
        plan = _assign(counts[tile], widths, spill)
        assert plan is not None, "Bug: packing widths do not fit a tile"
        filled = {s: 0 for s in widths}
        for storage, moves in plan.items():
            queue = [v for v in vectors if v.storage == storage]
            for target, count in moves:
                for vec in queue[:count]:
                    placed[target][(tile, filled[target])] = vec
                    where[vec.key] = (tile, offsets[target] + filled[target])
                    filled[target] += 1
                queue = queue[count:]
    return placed, where, position


def _assign(counts: dict, widths: dict, spill: dict) -> dict | None:
    """Slots of each storage used by a tile's vectors (narrowest first, the rest spilling to the
    next wider storage that holds them), or ``None`` when they do not fit ``widths``."""
    used = {s: 0 for s in widths}
    plan = {}
    for storage in (Storage.INT4, Storage.INT8, Storage.FP16, Storage.FLOAT):
        need = counts.get(storage, 0)
        path = [storage] + spill.get(storage, [])
        for target in path:
            if target not in widths:
                continue
            take = min(need, widths[target] - used[target])
            if take > 0:
                plan.setdefault(storage, []).append((target, take))
                used[target] += take
                need -= take
        if need:
            return None
    return plan


def _choose_widths(tile_counts: list[dict], cost: dict, spill: dict) -> dict:
    """Slots per storage (the same in every tile) of least total cost that fit every tile."""
    present = sorted({s for c in tile_counts for s in c if c[s]}, key=_CLASS_ORDER.index)
    most = {s: max(c.get(s, 0) for c in tile_counts) for s in present}
    # Every storage that can receive spilled vectors may need more slots than its own vectors.
    for s in present:
        for t in spill.get(s, []):
            most[t] = max(most.get(t, 0), max(sum(c.get(u, 0) for u in _HOLDS[t] if u in c) for c in tile_counts))
    order = sorted(most, key=_CLASS_ORDER.index)
    best, best_cost = None, None

    def search(i, widths):
        nonlocal best, best_cost
        if i == len(order):
            if all(_assign(c, widths, spill) is not None for c in tile_counts):
                total = sum(widths[s] * cost[s] for s in widths)
                if best_cost is None or total < best_cost:
                    best, best_cost = dict(widths), total
            return
        storage = order[i]
        for w in range(most[storage] + 1):
            widths[storage] = w
            if best_cost is not None and sum(widths[s] * cost[s] for s in widths) >= best_cost:
                break
            search(i + 1, widths)
        del widths[storage]

    if int(np.prod([most[s] + 1 for s in order])) > 4096:
        # Too many combinations: each storage in its own slots, no packing.
        return {s: max(c.get(s, 0) for c in tile_counts) for s in present}
    search(0, {})
    return {s: w for s, w in best.items() if w}


def _spill_paths(vectors: list[_Vec], dtype) -> dict:
    """Which wider storages each storage's vectors may move to, exactly."""
    present = {v.storage for v in vectors}
    paths = {}
    for storage in present:
        path = []
        for target in (Storage.INT8, Storage.FLOAT):
            if target == storage or storage not in _HOLDS[target]:
                continue
            if target == Storage.FLOAT and not all(_exact_in(v, dtype) for v in vectors if v.storage == storage):
                continue
            path.append(target)
        paths[storage] = path
    return paths


def _slot_bytes(storage: Storage, length: int, dtype, scale_bytes: int, g: int) -> float:
    if storage == Storage.FLOAT:
        return length * np.dtype(dtype).itemsize
    if storage == Storage.FP16:
        return 2 * length
    groups = group_count(length, g)
    return (length if storage == Storage.INT8 else length / 2) + groups * scale_bytes


def _part(names, stem, storage, dtype, shape_prefix, slots, length, vectors_at) -> Part:
    """A part of ``shape_prefix + (slots, length)`` holding vectors at ``vectors_at``
    (``{(prefix index..., slot): _Vec}``), the contraction along ``length``."""
    if not storage.is_int:
        values = np.zeros((*shape_prefix, slots, length), dtype=_part_values(storage, dtype))
        for where, vec in vectors_at.items():
            data = vec.dequantized() if vec.storage != storage else vec.values
            values[where][: data.size] = data
        return Part(storage, names.add(f"{stem}.{storage.label}", values, "payload", storage))
    g = min(min(v.group, length) for v in vectors_at.values())
    G = group_count(length, g)
    # float32 when any vector's scales are (a float16 copy of float32 scales would round them).
    scale_dtype = np.result_type(*(v.scales.dtype for v in vectors_at.values()))
    q = np.zeros((*shape_prefix, slots, G * g), dtype=np.int8)
    scales = np.zeros((*shape_prefix, slots, G, 1), dtype=scale_dtype)
    for where, vec in vectors_at.items():
        q[where][: vec.values.size] = vec.values
        own = np.minimum((np.arange(G) * g) // vec.group, vec.scales.size - 1)
        scales[where][:, 0] = vec.scales[own].astype(scale_dtype)
    payload = names.add(f"{stem}.{storage.label}", q.reshape(*shape_prefix, slots, G, g), "payload", storage)
    sc = names.add(f"{stem}.{storage.label}_scales", scales, "scales")
    return Part(storage, payload, sc, deq_shape=(*shape_prefix, slots, G * g), length=length if G * g != length else 0)


def _mixed_scales(scales) -> bool:
    """Integer scales in both float16 and float32 (``None``: not an integer array)."""
    return len({sc.dtype for sc in scales if sc is not None}) > 1


def _half_scaled(scales) -> bool:
    """An integer array with float16 scales. Beside float32-scaled ones it is stored as float
    values: one integer part multiplies in one scale dtype, and the float32 product of a
    float16-scaled integer is not its value (``dequantize_groupwise`` rounds it to float16)."""
    return scales is not None and scales.dtype == np.float16


def _scale_bytes(vectors) -> int:
    return max((v.scales.dtype.itemsize for v in vectors if v.scales is not None), default=4)


class _OutputSegments:
    """A left stack ``(B, O, L)``: each batch (row tile) holds vectors (columns of its terms'
    ``U_t``, length ``L`` along the contraction) in slots along ``O``; the slots are split by
    storage, and a vector may use a slot of a wider storage that holds it exactly."""

    def __init__(self, names: _Names, B: int, L: int, dtype, stem: str):
        self.names, self.B, self.L, self.dtype, self.stem = names, B, L, np.dtype(dtype), stem
        self.vectors: list[list[_Vec]] = [[] for _ in range(B)]
        self.arrays: dict = {}

    def add(self, batch: int, arr: StoredArray, key) -> None:
        """Place the columns of ``arr`` (``L_t x k``) in tile ``batch``; vector ``k`` has key ``(key, k)``."""
        self.vectors[batch] += _columns(arr, key)
        self.arrays[key] = arr

    def build(self) -> tuple[Stack, dict]:
        """The stack and, per vector key, ``(batch, output row)``."""
        if _mixed_scales(v.scales for vs in self.vectors for v in vs):
            self.vectors = [[_Vec(v.key, Storage.FLOAT, v.dequantized()) if _half_scaled(v.scales) else v for v in vs]
                            for vs in self.vectors]
        every = [v for vs in self.vectors for v in vs]
        spill = _spill_paths(every, self.dtype)
        scale_bytes = _scale_bytes(every)
        g = min((v.group for v in every if v.scales is not None), default=16)
        cost = {s: _slot_bytes(s, self.L, self.dtype, scale_bytes, g) for s in _CLASS_ORDER}
        counts = [{s: sum(v.storage == s for v in vs) for s in _CLASS_ORDER} for vs in self.vectors]
        widths = _choose_widths(counts, cost, spill)
        placed, where, position = _place(self.vectors, counts, widths, spill, _CLASS_ORDER)
        parts = [_part(self.names, self.stem, s, self.dtype, (self.B,), widths[s], self.L, placed[s])
                 for s in _CLASS_ORDER if s in widths]
        vectors = {}
        for (key, k), slot in where.items():
            arr = self.arrays[key]
            vectors[slot] = (arr, k, 0, arr.shape[0])
        return Stack(parts, axis=1, shape=(self.B, position, self.L), vectors=vectors), where


class _ContractionSegments:
    """A right stack ``(C, c, J)``: in each tile, the right arrays' rows (``K_t`` rows of
    ``c``-wide chunks) sit side by side along the contraction ``J``. Float and float16 rows
    are vectors (float16 ones may use float slots); integer arrays keep one segment per array
    (their scales run along the contraction)."""

    def __init__(self, names: _Names, C: int, c: int, dtype, stem: str):
        self.names, self.C, self.c, self.dtype, self.stem = names, C, c, np.dtype(dtype), stem
        self.items: list[list] = [[] for _ in range(C)]
        self.origins: dict = {}

    def add(self, tile: int, arr: StoredArray, cols: slice, key) -> None:
        """Place columns ``cols`` of ``arr`` (``K_t x cols``) transposed in tile ``tile``; row
        ``k`` of it gets the key ``(key, k)``."""
        self.items[tile].append((key, arr, cols))
        self.origins[key] = (arr, cols)

    def build(self, pack: bool = True) -> tuple[Stack, dict]:
        """The stack and, per row key, ``(tile, J position)``.

        With ``pack=False`` every row stays in its own storage, in the order added (a term's
        rows stay contiguous).
        """
        C, c = self.C, self.c
        if _mixed_scales(arr.scales for items in self.items for _, arr, _ in items):
            self.items = [[(key, StoredArray.exact(arr.dequantized()) if _half_scaled(arr.scales) else arr, cols)
                           for key, arr, cols in items] for items in self.items]
        floats = (Storage.FLOAT, Storage.FP16)
        flat = [[_Vec((key, k), arr.storage, arr.values[k, cols]) for key, arr, cols in items
                 if not arr.storage.is_int for k in range(arr.shape[0])] for items in self.items]
        every = [v for vs in flat for v in vs]
        spill = _spill_paths(every, self.dtype) if pack else {}
        counts = [{s: sum(v.storage == s for v in vs) for s in floats} for vs in flat]
        if pack and every:
            cost = {s: _slot_bytes(s, c, self.dtype, 4, 16) for s in floats}
            widths = _choose_widths(counts, cost, spill)
        else:
            widths = {s: max(cn[s] for cn in counts) for s in floats if any(cn[s] for cn in counts)}
        placed, where, position = _place(flat, counts, widths, spill, floats)
        parts = []
        for storage in floats:
            if storage not in widths:
                continue
            values = np.zeros((C, widths[storage], c), dtype=_part_values(storage, self.dtype))
            for (j, slot), vec in placed[storage].items():
                data = vec.dequantized() if vec.storage != storage else vec.values
                values[j, slot, : data.size] = data
            parts.append(Part(storage, self.names.add(f"{self.stem}.{storage.label}", values.transpose(0, 2, 1), "payload", storage)))
        for storage in (Storage.INT8, Storage.INT4):
            per_tile = [[(key, arr, cols) for key, arr, cols in items if arr.storage == storage] for items in self.items]
            if any(per_tile):
                part, length = self._int_part(storage, per_tile, where, position)
                parts.append(part)
                position += length
        vectors = {}
        for (key, k), slot in where.items():
            arr, cols = self.origins[key]
            vectors[slot] = (arr, k, *cols.indices(arr.shape[1])[:2])
        return Stack(parts, axis=2, shape=(C, c, position), vectors=vectors), where

    def _int_part(self, storage, per_tile, where, offset) -> tuple[Part, int]:
        C, c = self.C, self.c
        arrays = [a for items in per_tile for _, a, _ in items]
        single = all(a.shape[0] <= a.group for a in arrays)
        if single:
            g, G = max(a.shape[0] for a in arrays), 1
        else:
            g = min(a.group for a in arrays if a.shape[0] > a.group)
            G = max(group_count(a.shape[0], g) for a in arrays)
        seg = G * g
        nseg = max(len(items) for items in per_tile)
        scale_dtype = np.result_type(*(a.scales.dtype for a in arrays))
        q = np.zeros((C, c, nseg, G, g), dtype=np.int8)
        scales = np.zeros((C, c, nseg, G, 1), dtype=scale_dtype)
        for j, items in enumerate(per_tile):
            for p, (key, arr, cols) in enumerate(items):
                rows = arr.shape[0]
                chunk = arr.values[:, cols]
                flat = np.zeros((seg, chunk.shape[1]), dtype=np.int8)
                flat[:rows] = chunk
                q[j, : chunk.shape[1], p] = flat.T.reshape(chunk.shape[1], G, g)
                own = np.zeros(G, dtype=int) if single else np.minimum((np.arange(G) * g) // arr.group, arr.scales.shape[0] - 1)
                scales[j, : chunk.shape[1], p, :, 0] = arr.scales[own][:, cols].T.astype(scale_dtype)
                for k in range(rows):
                    where[(key, k)] = (j, offset + p * seg + k)
        payload = self.names.add(f"{self.stem}.{storage.label}", q, "payload", storage)
        sc = self.names.add(f"{self.stem}.{storage.label}_scales", scales, "scales")
        return Part(storage, payload, sc, deq_shape=(C, c, nseg * seg)), nseg * seg


# ----------------------------------------------------------------------------- plan


def _tiles(names: _Names, ranges, total: int, key: str) -> Tiles:
    """Row tiles of ``Xt`` for sorted disjoint ``ranges``."""
    size = _grid_width(ranges, total)
    if size:
        order = [a // size for a, _ in ranges]
        full = total // size
        slabs = None if order == list(range(full)) else names.index(f"{key}.slabs", order)
        return Tiles(key, len(ranges), size, True, slabs=slabs)
    S = max(b - a for a, b in ranges)
    rows = np.zeros((len(ranges), S), dtype=np.int64)
    for i, (a, b) in enumerate(ranges):
        rows[i, : b - a] = np.arange(a, b)
    return Tiles(key, len(ranges), S, False, rows=names.index(f"{key}.rows", rows.ravel()))


def _placement(names: _Names, tiles, c: int, n: int, key: str) -> Tensor | None:
    """Output rows for column tiles ``tiles`` of padded width ``c`` (``None``: the uniform grid)."""
    if len(tiles) * c == n and all(a == j * c and b == a + c for j, (a, b) in enumerate(tiles)):
        return None
    zero_row = len(tiles) * c
    index = np.full(n, zero_row, dtype=np.int64)
    for j, (a, b) in enumerate(tiles):
        index[a:b] = j * c + np.arange(b - a)
    return names.index(f"{key}.place", index)


def _band_tiles(classes, n: int):
    """Column tiles of a band of column size classes, or ``None`` when they do not fit one grid."""
    if len(classes) == 1:
        return list(classes[0])
    finest = classes[0]
    size = _grid_width(finest, n)
    if not size:
        return None
    for cls in classes[1:]:
        if any(a % size or (b % size and b != n) for a, b in cls):
            return None
    covered = sorted({j for cls in classes for a, b in cls for j in range(a // size, -(-b // size))})
    return [(j * size, min((j + 1) * size, n)) for j in covered]


class BatchedBuilder:
    """Builds the parts of batched plans of one H-matrix once, and plans from them.

    The left groups are the same in every plan; dense groups and each band (a run of column
    size classes) are built when first asked for, so the cost model can price many plans for
    the cost of building each part once.
    """

    def __init__(self, hm: HMatrix, dtype, prefix: str = ""):
        self.hm, self.dtype = hm, np.dtype(dtype)
        self.m, self.n = hm.shape
        self.names = _Names()
        self.stem = f"{prefix}." if prefix else ""
        terms = terms_of(hm)
        self.empty = not terms
        self.lowrank = [t for t in terms if t.kind == BlockKind.LOWRANK]
        self.dense = [t for t in terms if t.kind == BlockKind.DENSE]
        self.row_perm = self.names.index(f"{self.stem}row_perm", hm.row_perm) if hm.row_perm is not None else None
        self.col_inverse = None
        if hm.col_perm is not None:
            inverse = np.empty(self.n, dtype=np.int64)
            inverse[hm.col_perm] = np.arange(self.n)
            self.col_inverse = self.names.index(f"{self.stem}col_perm", inverse)
        self.tilings: dict[tuple, Tiles] = {}
        self.source_row: dict[tuple, tuple[str, int]] = {}  # (term, k) -> (left key, row of T flattened)
        self.lefts = [self._left(li, ranges) for li, ranges in enumerate(size_classes((t.r0, t.r1) for t in self.lowrank))]
        self.col_classes = size_classes((t.c0, t.c1) for t in self.lowrank)
        self._bands: dict[tuple[int, int], RightGroup | None] = {}
        self._dense: dict[bool, tuple[list, list]] = {}

    def _left(self, li: int, ranges) -> LeftGroup:
        key = f"{self.stem}l{li}"
        tiles = self.tilings.get(tuple(ranges)) or _tiles(self.names, ranges, self.m, f"{key}.x")
        self.tilings[tuple(ranges)] = tiles
        tile_of = {r: i for i, r in enumerate(ranges)}
        members = [t for t in self.lowrank if (t.r0, t.r1) in tile_of]
        seg = _OutputSegments(self.names, len(ranges), tiles.S, self.dtype, f"{key}.u")
        for t in members:
            seg.add(tile_of[(t.r0, t.r1)], t.a, t.index)
        stack, where = seg.build()
        K = stack.shape[1]
        for (index, k), (tile, row) in where.items():
            self.source_row[(index, k)] = (key, tile * K + row)
        return LeftGroup(key, tiles, stack, [t.index for t in members])

    def band(self, first: int, last: int) -> RightGroup | None:
        """The right band over column size classes ``first..last`` (``None``: no common grid)."""
        if (first, last) not in self._bands:
            classes = self.col_classes[first : last + 1]
            tiles = _band_tiles(classes, self.n)
            group = None
            if tiles is not None:
                ranges = {r for cls in classes for r in cls}
                members = [t for t in self.lowrank if (t.c0, t.c1) in ranges]
                group = _band(self.names, tiles, members, self.m, self.n, self.dtype, f"{self.stem}r{first}_{last}",
                              self.source_row, self.lefts)
            self._bands[(first, last)] = group
        return self._bands[(first, last)]

    def dense_parts(self, grouped: bool) -> tuple[list, list]:
        """``(dense groups, bands of the other dense blocks)``: dense blocks on uniform grids in
        groups of their own when ``grouped``, the rest (or all) in bands of one column size."""
        if grouped not in self._dense:
            groups, rest = [], list(self.dense)
            if grouped:
                by_shape = defaultdict(list)
                for t in self.dense:
                    by_shape[(t.rows, t.cols)].append(t)
                rest = []
                for di, ((rows, cols), members) in enumerate(sorted(by_shape.items())):
                    group = _dense_group(self.names, members, self.m, self.n, self.dtype, f"{self.stem}d{di}", self.tilings)
                    if group is None:
                        rest += members
                    else:
                        groups.append(group)
            bands = []
            for ci, cls in enumerate(size_classes((t.c0, t.c1) for t in rest)):
                ranges = set(cls)
                members = [t for t in rest if (t.c0, t.c1) in ranges]
                bands.append(_band(self.names, list(cls), members, self.m, self.n, self.dtype,
                                   f"{self.stem}dr{int(grouped)}_{ci}", self.source_row, self.lefts))
            self._dense[grouped] = (groups, bands)
        return self._dense[grouped]

    def plan(self, options: PlanOptions | None = None) -> Plan | None:
        """The plan for ``options`` (``None`` when a band has no common grid)."""
        options = options or PlanOptions()
        runs = list(options.bands) if options.bands is not None else [1] * len(self.col_classes)
        if sum(runs) != len(self.col_classes) or any(r < 1 for r in runs):
            raise ValueError(f"bands {options.bands} do not partition {len(self.col_classes)} column classes")
        rights, start = [], 0
        for count in runs:
            band = self.band(start, start + count - 1)
            if band is None:
                return None
            rights.append(band)
            start += count
        groups, bands = self.dense_parts(options.dense_groups)
        rights = groups + rights + bands
        used = _used_tensors(self.lefts, rights, self.row_perm, self.col_inverse)
        tilings = list({id(t): t for t in [lg.tiles for lg in self.lefts] + [rg.tiles for rg in rights if rg.tiles]}.values())
        return Plan((self.m, self.n), self.dtype, self.row_perm, self.col_inverse, tilings, self.lefts, rights, used,
                    options=options)


def _used_tensors(lefts, rights, *extra) -> list[Tensor]:
    """The tensors a plan made of these groups reads, each once, in creation order."""
    found: dict[int, Tensor] = {}

    def add(t):
        if t is not None:
            found[id(t)] = t

    for t in extra:
        add(t)
    for lg in lefts:
        add(lg.tiles.slabs)
        add(lg.tiles.rows)
        for p in lg.stack.parts:
            add(p.payload)
            add(p.scales)
    for rg in rights:
        for t in (rg.gather, rg.slabs, rg.placement):
            add(t)
        if rg.tiles is not None:
            add(rg.tiles.slabs)
            add(rg.tiles.rows)
        for p in rg.stack.parts:
            add(p.payload)
            add(p.scales)
    return list(found.values())


def build_batched(hm: HMatrix, dtype, options: PlanOptions | None = None, prefix: str = "") -> Plan | None:
    """The batched plan of ``hm`` in the activation ``dtype`` (``None`` when ``hm`` has no term,
    or when ``options.bands`` cannot tile the columns)."""
    builder = BatchedBuilder(hm, dtype, prefix)
    return None if builder.empty else builder.plan(options)


def _dense_group(names, members, m, n, dtype, key, tilings) -> RightGroup | None:
    """Dense blocks of one shape whose rows and columns lie on uniform grids: row tiles of
    ``Xt`` are gathered whole (or taken in order, for a block diagonal), one slot per block.

    ``None`` when the blocks are not on grids, or an integer class would pad its segments
    (then the slots would not line up with the gathered tiles).
    """
    rows, cols = members[0].rows, members[0].cols
    if m % rows or n % cols or any(t.r0 % rows or t.c0 % cols for t in members):
        return None
    row_ranges = tuple((i * rows, (i + 1) * rows) for i in range(m // rows))
    tiles = tilings.get(row_ranges)
    if tiles is None:
        tiles = tilings[row_ranges] = Tiles(f"{key}.x", len(row_ranges), rows, True)
    per_col = defaultdict(lambda: defaultdict(list))
    for t in sorted(members, key=lambda t: t.r0):
        per_col[t.c0 // cols][t.a.storage].append(t)
    col_tiles = sorted(per_col)
    seg = _ContractionSegments(names, len(col_tiles), cols, dtype, f"{key}.d")
    slots = {s: max(len(per_col[j][s]) for j in col_tiles) for s in _CLASS_ORDER if any(per_col[j][s] for j in col_tiles)}
    slab_index = np.zeros((len(col_tiles), sum(slots.values())), dtype=np.int64)
    for j, tile in enumerate(col_tiles):
        first = 0
        for storage, count in slots.items():
            for p, t in enumerate(per_col[tile][storage]):
                seg.add(j, t.a, slice(0, cols), t.index)
                slab_index[j, first + p] = t.r0 // rows
            first += count
    stack, where = seg.build(pack=False)
    if stack.shape[2] != slab_index.shape[1] * rows:
        return None  # an integer class pads its segments beyond the block's rows
    identity = slab_index.shape[1] == 1 and len(col_tiles) == tiles.R and list(slab_index[:, 0]) == list(range(tiles.R))
    slabs = None if identity else names.index(f"{key}.slabs", slab_index.ravel())
    placement = _placement(names, [(j * cols, (j + 1) * cols) for j in col_tiles], cols, n, key)
    return RightGroup(key, len(col_tiles), cols, stack.shape[2], stack, ["x"], tiles=tiles, slabs=slabs,
                      placement=placement, terms=[t.index for t in members])


def _band(names, tiles, members, m, n, dtype, key, source_row, lefts) -> RightGroup:
    """A right band: an element gather from ``Xt`` (for dense terms) and the left groups' ``T``."""
    c = max(b - a for a, b in tiles)
    seg = _ContractionSegments(names, len(tiles), c, dtype, f"{key}.v")
    starts = [a for a, _ in tiles]
    chunks = []  # (term, tile, its slot key)
    for t in members:
        j = int(np.searchsorted(starts, t.c0, side="right")) - 1
        j = max(j, 0)
        while j < len(tiles) and tiles[j][0] < t.c1:
            a, b = max(tiles[j][0], t.c0), min(tiles[j][1], t.c1)
            if a < b:
                seg.add(j, t.right, slice(a - t.c0, b - t.c0), (t.index, j))
                chunks.append((t, j))
            j += 1
    stack, where = seg.build()
    sources = ["x"] if any(t.kind == BlockKind.DENSE for t in members) else []
    sources += [lg.key for lg in lefts if any(t.kind == BlockKind.LOWRANK and source_row[(t.index, 0)][0] == lg.key for t in members)]
    offsets, position = {}, 0
    for s in sources:
        offsets[s] = position
        if s == "x":
            position += m
        else:
            shape = next(lg.stack.shape for lg in lefts if lg.key == s)
            position += shape[0] * shape[1]
    gather = np.zeros((len(tiles), stack.shape[2]), dtype=np.int64)
    for t, j in chunks:
        for k in range(t.width):
            _, jo = where[((t.index, j), k)]
            if t.kind == BlockKind.DENSE:
                gather[j, jo] = offsets["x"] + t.r0 + k
            else:
                group, row = source_row[(t.index, k)]
                gather[j, jo] = offsets[group] + row
    placement = _placement(names, tiles, c, n, key)
    return RightGroup(key, len(tiles), c, stack.shape[2], stack, sources, gather=names.index(f"{key}.idx", gather.ravel()),
                      placement=placement, terms=sorted({t.index for t in members}))


# ----------------------------------------------------------------------------- numpy execution


def _dequantize_part(part: Part, dtype) -> np.ndarray:
    values = part.payload.values
    if part.storage == Storage.FLOAT:
        return values.astype(dtype)
    if part.storage == Storage.FP16:
        return values.astype(dtype)
    scales = part.scales.values
    out = (values.astype(scales.dtype) * scales).reshape(part.deq_shape)
    if part.length:
        out = out[..., : part.length]
    return out.astype(dtype)


def stack_values(stack: Stack, dtype) -> np.ndarray:
    """The stack as onnxruntime folds it (each part dequantized, concatenated, reshaped)."""
    out = np.concatenate([_dequantize_part(p, dtype) for p in stack.parts], axis=stack.axis)
    return out.reshape(stack.shape) if stack.reshape else out


def _tile(xt: np.ndarray, tiles: Tiles) -> np.ndarray:
    if tiles.grid:
        full = xt.reshape(xt.shape[0] // tiles.S, tiles.S, xt.shape[1])
        return full if tiles.slabs is None else full[tiles.slabs.values]
    return xt[tiles.rows.values].reshape(tiles.R, tiles.S, xt.shape[1])


def run_plan(plan: Plan, x: np.ndarray, dtype=np.float64) -> np.ndarray:
    """Execute ``plan`` on ``x`` (``(..., m)``) with numpy, step by step as the emitted nodes do
    (in ``dtype``, float64 by default); returns ``(..., n)``."""
    m, n = plan.shape
    x = np.asarray(x)
    lead = x.shape[:-1]
    xt = x.reshape(-1, m).astype(dtype).T
    if plan.row_perm is not None:
        xt = xt[plan.row_perm.values]
    N = xt.shape[1]
    ts = {}
    for lg in plan.lefts:
        R, K, _ = lg.stack.shape
        ts[lg.key] = np.matmul(stack_values(lg.stack, dtype), _tile(xt, lg.tiles)).reshape(R * K, N)
    total = np.zeros((n, N), dtype=dtype)
    for rg in plan.rights:
        v = stack_values(rg.stack, dtype)
        if rg.tiles is not None:
            src = _tile(xt, rg.tiles)
            if rg.slabs is not None:
                src = src[rg.slabs.values]
            gathered = src.reshape(rg.C, rg.J, N)
        else:
            src = np.concatenate([xt if s == "x" else ts[s] for s in rg.sources], axis=0)
            gathered = src[rg.gather.values].reshape(rg.C, rg.J, N)
        out = np.matmul(v, gathered).reshape(rg.C * rg.c, N)
        if rg.placement is not None:
            out = np.concatenate([out, np.zeros((1, N), dtype=dtype)])[rg.placement.values]
        total += out
    if plan.col_inverse is not None:
        total = total[plan.col_inverse.values]
    return total.T.reshape(*lead, n)
