"""The "simple choices" the adaptive H-matrix must never lose to, computed independently.

Each partition gets exact SVDs of its blocks and the same global budget
``tol^2 ||W||_F^2``, spent greedily: singular values are dropped in order of increasing
``sigma^2 / (rows + cols)`` (squared error per parameter saved) across all blocks, while the
budget allows. A block of rank k then stores ``min(k * (rows + cols), rows * cols)`` values.

In bytes (``oracle_bytes``): the weight dense in each uniform storage (float16, int8 or int4 in
every group size) whose error meets the tol, the global truncated SVD with both factors in one
uniform storage, and the fixed partitions above with float factors, each stored array costing
what ``dehm_onnx.hmatrix.storage`` says and each stored block one layout row.
"""

from __future__ import annotations

import heapq

import numpy as np


def _bisect(start: int, end: int, depth: int) -> list[tuple[int, int]]:
    if depth == 0 or end - start <= 1:
        return [(start, end)]
    mid = start + (end - start) // 2
    return _bisect(start, mid, depth - 1) + _bisect(mid, end, depth - 1)


def uniform_partition(m: int, n: int, parts: int) -> list[tuple[int, int, int, int]]:
    """A parts x parts block partition by repeated bisection of rows and columns."""
    depth = int(np.log2(parts))
    return [(a, b, c, d) for a, b in _bisect(0, m, depth) for c, d in _bisect(0, n, depth)]


def hodlr_partition(m: int, n: int, leaf: int = 64) -> list[tuple[int, int, int, int]]:
    """HODLR: off-diagonal blocks whole at every level, diagonal blocks split down to ``leaf``."""
    blocks = []

    def split(r0, r1, c0, c1):
        if r1 - r0 <= leaf and c1 - c0 <= leaf:
            blocks.append((r0, r1, c0, c1))
            return
        rm = r0 + (r1 - r0) // 2 if r1 - r0 > leaf else r1
        cm = c0 + (c1 - c0) // 2 if c1 - c0 > leaf else c1
        if rm < r1 and cm < c1:
            blocks.extend([(r0, rm, cm, c1), (rm, r1, c0, cm)])
            split(r0, rm, c0, cm)
            split(rm, r1, cm, c1)
        elif rm < r1:
            split(r0, rm, c0, c1)
            split(rm, r1, c0, c1)
        else:
            split(r0, r1, c0, cm)
            split(r0, r1, cm, c1)

    split(0, m, 0, n)
    return blocks


def greedy_params(w: np.ndarray, tol: float, partition) -> int:
    """Stored parameters of ``partition`` after greedy global truncation at ``tol``."""
    budget = (tol * np.linalg.norm(w)) ** 2
    state = []
    heap = []
    for i, (r0, r1, c0, c1) in enumerate(partition):
        s = np.linalg.svd(w[r0:r1, c0:c1], compute_uv=False)
        state.append([len(s), s, (r1 - r0) + (c1 - c0), (r1 - r0) * (c1 - c0)])
        if len(s):
            heapq.heappush(heap, (s[-1] ** 2 / state[i][2], i))
    while heap:
        _, i = heapq.heappop(heap)
        k, s, size, _ = state[i]
        cost = s[k - 1] ** 2
        if cost > budget:
            continue
        budget -= cost
        state[i][0] = k - 1
        if k - 1 > 0:
            heapq.heappush(heap, (s[k - 2] ** 2 / size, i))
    return int(sum(min(k * size, area) for k, _, size, area in state))


def oracle_params(w: np.ndarray, tol: float) -> dict[str, int]:
    """Parameters of each simple choice: dense, global SVD, BLR 2x2/4x4/8x8, HODLR-64."""
    m, n = w.shape
    return {
        "dense": m * n,
        "svd": greedy_params(w, tol, [(0, m, 0, n)]),
        "blr2": greedy_params(w, tol, uniform_partition(m, n, 2)),
        "blr4": greedy_params(w, tol, uniform_partition(m, n, 4)),
        "blr8": greedy_params(w, tol, uniform_partition(m, n, 8)),
        "hodlr64": greedy_params(w, tol, hodlr_partition(m, n, 64)),
    }


# --------------------------------------------------------------------------- bytes

# The uniform formats of the engine: (storage, group); group 0 for the float storages.
UNIFORM_FORMATS = [("float", 0), ("fp16", 0)] + [(s, g) for s in ("int8", "int4") for g in (16, 32, 64, 128)]


def _stored(a: np.ndarray, fmt: tuple[str, int], dtype, scale_dtype):
    """``(dequantized float64, bytes)`` of ``a`` in a uniform format, or None if it cannot be stored."""
    from dehm_onnx.hmatrix.storage import Storage, store

    storage = {"float": Storage.FLOAT, "fp16": Storage.FP16, "int8": Storage.INT8, "int4": Storage.INT4}[fmt[0]]
    stored = store(a, storage, dtype=dtype, group=fmt[1], scale_dtype=scale_dtype)
    if stored is None:
        return None
    return stored.dequantized().astype(np.float64), stored.nbytes


def dense_format_bytes(w: np.ndarray, tol: float, overhead: int, scale_dtype) -> dict[str, int]:
    """Bytes of ``w`` stored dense in each uniform format whose error meets ``tol``.

    The float format is the weight unchanged (no layout overhead).
    """
    w64 = w.astype(np.float64)
    budget = tol * np.linalg.norm(w64)
    out = {"dense": w.nbytes}
    for fmt in UNIFORM_FORMATS[1:]:
        got = _stored(w64, fmt, w.dtype, scale_dtype)
        if got is not None and np.linalg.norm(w64 - got[0]) <= budget:
            out[f"dense {fmt[0]}/g{fmt[1]}"] = got[1] + overhead
    return out


def svd_format_bytes(w: np.ndarray, tol: float, overhead: int, scale_dtype, formats=UNIFORM_FORMATS) -> dict[str, int]:
    """Bytes of the cheapest global truncated SVD ``(U S) Vt`` with both factors in one format.

    For each format, the smallest rank (from the smallest one whose truncation alone fits, up
    to 24 more) at which the error of the stored factors meets ``tol``, found by bisection.
    """
    w64 = w.astype(np.float64)
    budget = tol * np.linalg.norm(w64)
    u, s, vt = np.linalg.svd(w64, full_matrices=False)
    tails = np.sqrt(np.maximum(np.sum(s**2) - np.concatenate(([0.0], np.cumsum(s**2))), 0.0))
    first = max(int(np.argmax(tails <= budget)), 1)
    last = min(first + 24, len(s))

    def stored_bytes(k, fmt):
        a = _stored(u[:, :k] * s[:k], fmt, w.dtype, scale_dtype)
        b = _stored(vt[:k], fmt, w.dtype, scale_dtype)
        if a is None or b is None or np.linalg.norm(w64 - a[0] @ b[0]) > budget:
            return None
        return a[1] + b[1] + overhead

    out = {}
    for fmt in formats:
        if stored_bytes(last, fmt) is None:
            continue
        lo, hi = first - 1, last  # stored_bytes(hi) fits
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if stored_bytes(mid, fmt) is not None else (mid, hi)
        out[f"svd {fmt[0]}/g{fmt[1]}"] = stored_bytes(hi, fmt)
    return out


def partition_bytes(w: np.ndarray, tol: float, overhead: int) -> dict[str, int]:
    """Bytes of the fixed float partitions (greedy global truncation), one layout row per block."""
    m, n = w.shape
    itemsize = w.dtype.itemsize
    parts = {
        "blr2": uniform_partition(m, n, 2),
        "blr4": uniform_partition(m, n, 4),
        "blr8": uniform_partition(m, n, 8),
        "hodlr64": hodlr_partition(m, n, 64),
    }
    return {name: greedy_params(w.astype(np.float64), tol, p) * itemsize + overhead * len(p) for name, p in parts.items()}


def oracle_bytes(w: np.ndarray, tol: float, overhead: int, *, quantized: bool, scale_dtype=None) -> dict[str, int]:
    """Bytes of every simple choice at ``tol``: dense in each format, global SVD, fixed partitions.

    With ``quantized=False`` only the float choices (the weight unchanged, float SVD, partitions).
    """
    scale_dtype = scale_dtype or w.dtype
    out = {"dense": w.nbytes}
    out.update(partition_bytes(w, tol, overhead))
    if quantized:
        out.update(dense_format_bytes(w, tol, overhead, scale_dtype))
        out.update(svd_format_bytes(w, tol, overhead, scale_dtype))
    else:
        out.update(svd_format_bytes(w, tol, overhead, scale_dtype, formats=UNIFORM_FORMATS[:1]))
    return out
