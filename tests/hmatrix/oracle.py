"""The "simple choices" the adaptive H-matrix must never lose to, computed independently.

Each partition gets exact SVDs of its blocks and the same global budget
``tol^2 ||W||_F^2``, spent greedily: singular values are dropped in order of increasing
``sigma^2 / (rows + cols)`` (squared error per parameter saved) across all blocks, while the
budget allows. A block of rank k then stores ``min(k * (rows + cols), rows * cols)`` values.
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
