"""compress(): adaptive H-matrix construction with a global, certified error budget.

Given ``W`` (m x n) and ``tol``, find a tiling of (a row/column permutation of) ``W`` into
zero, dense and low-rank leaves that stores few parameters while

    ||W - W_H||_F <= tol * ||W||_F,

a bound that is checked on the stored (rounded) factors before the result is returned.

Algorithm ("dynamic error-bounded" refinement, arXiv:2409.07028, made global):

1. Cluster trees over rows and columns by bisection (optionally after a PCA reordering);
   the block tree pairs them, down to ``leaf_size``.
2. Every block of the tree gets its singular spectrum: exact (batched LAPACK) for small
   blocks, a randomized range finder of growing width for large ones, so the cost grows
   about as ``m * n`` times the ranks involved.
3. The error budget is spent globally. For a price ``lam`` of squared error, each block takes
   the cheapest of: zero, low-rank of rank k, dense, or its children, by
   ``params + lam * error^2`` (a bottom-up pass over the tree). Bisection on ``lam`` finds the
   smallest parameter count whose total squared error fits in ``tol^2 ||W||_F^2``; i.e. the
   singular values that are dropped are those that cost the least error per parameter saved,
   wherever they lie. The leftover budget is then spent greedily on further drops.
4. The factors are formed, rounded to the weight's dtype, and the error of the stored form is
   measured block by block in float64 and summed: that sum is the certified error.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, InvalidWeightError
from .cluster import pca_order, split_sizes
from .hmatrix import Block, BlockKind, HMatrix
from .lowrank import Spectrum, exact_spectra, randomized_spectrum, split_factors, tail_energy

__all__ = ["compress", "DEFAULT_LEAF_SIZE"]

DEFAULT_LEAF_SIZE = 32
# Blocks at most this small (in min(rows, cols)) get an exact SVD, larger ones a randomized
# range finder; matrices whose full SVD costs at most _EXACT_FLOPS get exact SVDs throughout.
_EXACT_MAX_SIDE = 64
_EXACT_FLOPS = 2**27
_STACK_ELEMENTS = 2**22
# permute="auto" tries a PCA reordering only when the natural order stores more than this.
_PERMUTE_IF_RATIO_ABOVE = 0.5
# Relative safety margins for floating-point summation of the certified error.
_CERT_MARGIN = 1e-9
_FLOAT_DTYPES = (np.float16, np.float32, np.float64)
_LOWRANK, _DENSE, _SUB = 0, 1, 2


def _check_inputs(w, tol) -> np.ndarray:
    w = np.asarray(w)
    if w.dtype.kind not in "f" or w.dtype.type not in _FLOAT_DTYPES:
        raise InvalidWeightError(f"weight dtype must be float16, float32 or float64, got {w.dtype}")
    if w.ndim != 2:
        raise InvalidWeightError(f"weight must be 2-D, got {w.ndim}-D with shape {w.shape}")
    if w.size == 0:
        raise InvalidWeightError(f"weight is empty (shape {w.shape})")
    bad = int(w.size - np.count_nonzero(np.isfinite(w)))
    if bad:
        raise InvalidWeightError(f"weight has {bad} NaN/Inf entries")
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.floating)) or not 0.0 < float(tol) < 1.0:
        raise ConfigError(f"tol must be in (0, 1), got {tol!r}")
    return w


# --------------------------------------------------------------------------- block tree


@dataclass(eq=False)
class _Level:
    """All blocks of one depth of the block tree, as parallel arrays."""

    r0: np.ndarray
    r1: np.ndarray
    c0: np.ndarray
    c1: np.ndarray
    child_start: np.ndarray  # index of the first child in the next level, -1 for leaves
    child_end: np.ndarray  # one past the last child in the next level, -1 for leaves
    tails: np.ndarray | None = None  # (blocks, kmax+1) squared error of rank k, inf if unknown
    spectra: list | None = None

    @property
    def rows(self) -> np.ndarray:
        return self.r1 - self.r0

    @property
    def cols(self) -> np.ndarray:
        return self.c1 - self.c0


def _children(start: int, end: int, leaf_size: int) -> list[tuple[int, int]]:
    if end - start <= leaf_size:
        return [(start, end)]
    left, _ = split_sizes(end - start)
    return [(start, start + left), (start + left, end)]


def _block_tree(m: int, n: int, leaf_size: int) -> list[_Level]:
    """Levels of the block tree over ``[0, m) x [0, n)``; children of a block are contiguous.

    Each dimension is bisected at least three times (leaves of at most a ceil(1/8) of it)
    so that the fixed 2x2, 4x4 and 8x8 partitions are always among the candidates.
    """
    row_leaf = min(leaf_size, -(-m // 8))
    col_leaf = min(leaf_size, -(-n // 8))
    blocks = [(0, m, 0, n)]
    levels = []
    while blocks:
        child_range, nxt = [], []
        for r0, r1, c0, c1 in blocks:
            rs, cs = _children(r0, r1, row_leaf), _children(c0, c1, col_leaf)
            if len(rs) == 1 and len(cs) == 1:
                child_range.append((-1, -1))
                continue
            start = len(nxt)
            nxt += [(a, b, c, d) for a, b in rs for c, d in cs]
            child_range.append((start, len(nxt)))
        arr = np.array(blocks, dtype=np.int64)
        ranges = np.array(child_range, dtype=np.int64)
        levels.append(_Level(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3], ranges[:, 0], ranges[:, 1]))
        blocks = nxt
    return levels


def _useful_rank(rows: int, cols: int) -> int:
    """Largest rank whose low-rank form stores fewer parameters than the dense block."""
    return (rows * cols - 1) // (rows + cols)


def _fair_share_params(level: _Level, budget2: float, total: int) -> np.ndarray:
    """Parameters each block would need if every entry got the same share of the budget.

    Only used to bound the rank search of larger blocks, never for the final choice.
    """
    share = budget2 * (level.rows * level.cols) / total
    rank = np.argmax(level.tails <= share[:, None], axis=1)
    fits = np.take_along_axis(level.tails, rank[:, None], axis=1)[:, 0] <= share
    dense = (level.rows * level.cols).astype(np.float64)
    return np.where(fits, np.minimum(rank * (level.rows + level.cols), dense), dense)


def _subtree_estimate(level: _Level, below: np.ndarray | None, budget2: float, total: int) -> np.ndarray:
    """Fair-share parameters of each block: the smaller of its own and its children's."""
    own = _fair_share_params(level, budget2, total)
    has = level.child_start >= 0
    if below is not None and has.any():
        own[has] = np.minimum(own[has], np.add.reduceat(below, level.child_start[has]))
    return own


def _fill_spectra(level: _Level, w: np.ndarray, budget2: float, rng: np.random.Generator, all_exact: bool, below_estimate) -> None:
    """Compute the spectra of a level's blocks and their tail energies (inf where unknown).

    Small blocks get exact singular values. A large block gets a randomized spectrum of rank
    at most what could beat its children's fair-share estimate (``below_estimate``); blocks
    that cannot beat it keep only the zero/dense options.
    """
    count = len(level.r0)
    kmax = max(_useful_rank(int(r), int(c)) for r, c in zip(level.rows, level.cols))
    level.tails = np.full((count, kmax + 1), np.inf)
    level.spectra = [None] * count
    shapes: dict[tuple[int, int], list[int]] = {}
    for i, (r, c) in enumerate(zip(level.rows.tolist(), level.cols.tolist())):
        shapes.setdefault((r, c), []).append(i)
    total = w.shape[0] * w.shape[1]
    for (r, c), idx in shapes.items():
        useful = _useful_rank(r, c)
        if all_exact or min(r, c) <= _EXACT_MAX_SIDE:
            # Stacks of bounded size: a whole level at once would copy the matrix.
            step = max(1, _STACK_ELEMENTS // (r * c))
            for chunk in range(0, len(idx), step):
                part = idx[chunk : chunk + step]
                stack = np.stack([w[level.r0[i] : level.r1[i], level.c0[i] : level.c1[i]] for i in part])
                fro2 = np.einsum("bij,bij->b", stack, stack)
                values = exact_spectra(stack)
                for j, i in enumerate(part):
                    level.spectra[i] = Spectrum(values[j], float(fro2[j]))
                    level.tails[i, : useful + 1] = tail_energy(values[j], fro2[j])[: useful + 1]
            continue
        target = 1e-2 * budget2 * (r * c) / total
        for i in idx:
            block = w[level.r0[i] : level.r1[i], level.c0[i] : level.c1[i]]
            cap = useful
            if below_estimate is not None and level.child_start[i] >= 0:
                children = below_estimate[level.child_start[i] : level.child_end[i]]
                cap = min(useful, int(2 * children.sum() // (r + c)))
            if cap < 1:
                level.tails[i, 0] = float(np.einsum("ij,ij->", block, block))
                continue
            spectrum = randomized_spectrum(block, max_rank=cap, target_tail2=target, rng=rng)
            level.spectra[i] = spectrum
            tails = tail_energy(spectrum.s, spectrum.fro2)[: cap + 1]
            level.tails[i, : len(tails)] = tails


# --------------------------------------------------------------------------- global allocation


@dataclass(eq=False)
class _Choice:
    """Per-level decisions of one bottom-up pass at a given error price."""

    kind: list[np.ndarray]
    rank: list[np.ndarray]
    params: float
    err2: float


def _choose(levels: list[_Level], lam: float) -> _Choice:
    """Bottom-up: each block picks the cheapest of low-rank(k) (k=0: zero), dense, children."""
    kinds, ranks = [None] * len(levels), [None] * len(levels)
    below_cost = below_params = below_err = None
    for depth in range(len(levels) - 1, -1, -1):
        lv = levels[depth]
        size = (lv.rows + lv.cols)[:, None]
        ks = np.arange(lv.tails.shape[1])[None, :]
        lowrank_cost = ks * size + lam * lv.tails
        k = np.argmin(lowrank_cost, axis=1)
        rows_idx = np.arange(len(k))
        lr_cost = lowrank_cost[rows_idx, k]
        dense_cost = (lv.rows * lv.cols).astype(np.float64)
        use_dense = dense_cost < lr_cost
        cost = np.where(use_dense, dense_cost, lr_cost)
        params = np.where(use_dense, dense_cost, (k * (lv.rows + lv.cols)).astype(np.float64))
        err = np.where(use_dense, 0.0, lv.tails[rows_idx, k])
        kind = np.where(use_dense, _DENSE, _LOWRANK)
        has = lv.child_start >= 0
        if has.any():
            starts = lv.child_start[has]
            sub_cost = np.add.reduceat(below_cost, starts)
            better = sub_cost < cost[has] * (1 - 1e-12)
            pick = np.flatnonzero(has)[better]
            cost[pick] = sub_cost[better]
            params[pick] = np.add.reduceat(below_params, starts)[better]
            err[pick] = np.add.reduceat(below_err, starts)[better]
            kind[pick] = _SUB
        kinds[depth], ranks[depth] = kind, k
        below_cost, below_params, below_err = cost, params, err
    return _Choice(kinds, ranks, float(below_params[0]), float(below_err[0]))


def _allocate(levels: list[_Level], budget2: float) -> _Choice:
    """The cheapest choice whose total squared error fits ``budget2`` (bisection on the price)."""
    total2 = sum(float(lv.tails[0, 0]) for lv in levels[:1])
    lo, hi = 1e-6 / total2, 1.0 / budget2
    best = _choose(levels, hi)
    while best.err2 > budget2 and hi < 1e300:
        lo, hi = hi, hi * 1e3
        best = _choose(levels, hi)
    if best.err2 > budget2:
        return best  # only dense everywhere remains; the caller certifies it
    for _ in range(48):
        mid = np.sqrt(lo * hi)
        trial = _choose(levels, mid)
        if trial.err2 <= budget2:
            hi, best = mid, trial
        else:
            lo = mid
        if hi / lo < 1 + 1e-4:
            break
    return best


@dataclass(eq=False)
class _Leaf:
    depth: int
    index: int
    kind: int  # _LOWRANK (rank 0 = zero block) or _DENSE
    rank: int


def _leaves(levels: list[_Level], choice: _Choice) -> list[_Leaf]:
    """Walk the chosen tree top-down and list its leaves."""
    out, stack = [], [(0, 0)]
    while stack:
        depth, i = stack.pop()
        kind = int(choice.kind[depth][i])
        if kind == _SUB:
            start, end = int(levels[depth].child_start[i]), int(levels[depth].child_end[i])
            stack += [(depth + 1, j) for j in range(end - 1, start - 1, -1)]
        else:
            out.append(_Leaf(depth, i, kind, int(choice.rank[depth][i])))
    return out


def _spend_leftover(levels: list[_Level], leaves: list[_Leaf], leftover2: float) -> float:
    """Greedily drop more singular values (cheapest squared error per parameter first)."""
    heap = []
    for n, leaf in enumerate(leaves):
        if leaf.kind == _LOWRANK and leaf.rank > 0:
            heapq.heappush(heap, (*_drop_price(levels, leaf), n))
    while heap:
        price, cost, n = heapq.heappop(heap)
        if cost > leftover2:
            continue
        leftover2 -= cost
        leaf = leaves[n]
        leaf.rank -= 1
        if leaf.rank > 0:
            heapq.heappush(heap, (*_drop_price(levels, leaf), n))
    return leftover2


def _drop_price(levels: list[_Level], leaf: _Leaf) -> tuple[float, float]:
    lv = levels[leaf.depth]
    tails = lv.tails[leaf.index]
    cost = float(tails[leaf.rank - 1] - tails[leaf.rank])
    return cost / float(lv.rows[leaf.index] + lv.cols[leaf.index]), cost


# --------------------------------------------------------------------------- materialize + certify


def _materialize(levels, leaves, w64, dtype) -> tuple[list[Block], float]:
    """Form the leaves' blocks in ``dtype`` and return them with their exact squared error."""
    blocks, err2 = [], 0.0
    for leaf in leaves:
        lv = levels[leaf.depth]
        r0, r1, c0, c1 = (int(a[leaf.index]) for a in (lv.r0, lv.r1, lv.c0, lv.c1))
        part = w64[r0:r1, c0:c1]
        if leaf.kind == _DENSE:
            blocks.append(Block(BlockKind.DENSE, r0, r1, c0, c1, dense=part.astype(dtype)))  # exact: w64 holds w's values
        elif leaf.rank == 0:
            blocks.append(Block(BlockKind.ZERO, r0, r1, c0, c1))
            err2 += float(np.einsum("ij,ij->", part, part))
        else:
            u, vt = _factors(lv.spectra[leaf.index], part, leaf.rank)
            u, vt = u.astype(dtype), vt.astype(dtype)
            residual = part - u.astype(np.float64) @ vt.astype(np.float64)
            block_err2 = float(np.einsum("ij,ij->", residual, residual))
            err2 += block_err2 if np.isfinite(block_err2) else np.inf
            blocks.append(Block(BlockKind.LOWRANK, r0, r1, c0, c1, u=u, vt=vt))
    return blocks, err2


def _factors(spectrum: Spectrum, part: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    if spectrum.u is not None:
        return split_factors(spectrum.u, spectrum.s, spectrum.vt, rank)
    u, s, vt = np.linalg.svd(part, full_matrices=False)
    return split_factors(u, s, vt, rank)


@dataclass(eq=False)
class _Candidate:
    blocks: list | None  # None: the whole weight, dense
    err2: float
    params: int
    row_perm: np.ndarray | None
    col_perm: np.ndarray | None


def _compress_in_order(wp, dtype, budget2, leaf_size, rng, row_perm, col_perm) -> _Candidate:
    """Compress ``wp`` (float64 W, already in the order ``row_perm``/``col_perm``) within ``budget2``."""
    levels = _block_tree(*wp.shape, leaf_size)
    all_exact = wp.shape[0] * wp.shape[1] * min(wp.shape) <= _EXACT_FLOPS
    estimate = None
    for level in reversed(levels):
        _fill_spectra(level, wp, budget2, rng, all_exact, estimate)
        estimate = _subtree_estimate(level, estimate, budget2, wp.size)
    dense = _Candidate(None, 0.0, wp.size, None, None)  # blocks filled in by compress()
    # Rounding to the stored dtype adds error; if it breaks the budget, plan with less of it.
    for shrink in (1.0, 0.5, 0.25, 0.1, 0.01):
        choice = _allocate(levels, budget2 * shrink)
        if choice.err2 > budget2 * shrink:
            break
        leaves = _leaves(levels, choice)
        _spend_leftover(levels, leaves, budget2 * shrink - choice.err2)
        blocks, err2 = _materialize(levels, leaves, wp, dtype)
        if err2 <= budget2:
            params = sum(b.params for b in blocks)
            if params < wp.size:
                return _Candidate(blocks, err2, params, row_perm, col_perm)
            break
    return dense


def _stored_bytes(candidate: _Candidate, itemsize: int) -> int:
    index = sum(p.size for p in (candidate.row_perm, candidate.col_perm) if p is not None)
    return candidate.params * itemsize + 8 * index


def compress(w, tol: float, *, seed: int = 0, leaf_size: int = DEFAULT_LEAF_SIZE, permute="auto") -> HMatrix:
    """Compress a weight into an H-matrix with ``||W - W_H||_F <= tol * ||W||_F``.

    Args:
        w: 2-D float16/32/64 array. Computation is in float64; factors are stored in w's dtype.
        tol: relative Frobenius tolerance in (0, 1).
        seed: seed of every random choice (range finders, PCA); equal seeds give equal results.
        leaf_size: blocks are not split below this many rows/columns.
        permute: ``False`` keeps the natural order; ``True`` reorders rows and columns by
            recursive PCA bisection; ``"auto"`` tries both and keeps the smaller in bytes
            (a permutation costs 8 bytes an index).

    Returns:
        An HMatrix whose ``certified_error`` bounds ``||W - W_H||_F`` for the stored factors and
        is at most ``tol * ||W||_F``. It is never larger than the dense weight: if nothing
        compresses, the result is one dense block.

    Raises:
        InvalidWeightError: not 2-D, not float16/32/64, empty, or NaN/Inf entries.
        ConfigError: tol outside (0, 1), bad leaf_size or permute.
    """
    w = _check_inputs(w, tol)
    if not isinstance(leaf_size, (int, np.integer)) or leaf_size < 1:
        raise ConfigError(f"leaf_size must be a positive integer, got {leaf_size!r}")
    if permute not in (True, False, "auto"):
        raise ConfigError(f"permute must be True, False or 'auto', got {permute!r}")
    started = time.perf_counter()
    m, n = w.shape
    w64 = w.astype(np.float64)
    norm = float(np.linalg.norm(w64))
    if norm == 0.0:
        return HMatrix((m, n), w.dtype, (Block(BlockKind.ZERO, 0, m, 0, n),), 0.0, 0.0, float(tol))
    budget2 = (tol * norm * (1 - _CERT_MARGIN)) ** 2
    rng = np.random.default_rng(seed)
    candidates = []
    can_permute = max(m, n) > leaf_size
    if permute in (False, "auto") or not can_permute:
        candidates.append(_compress_in_order(w64, w.dtype, budget2, leaf_size, rng, None, None))
    del w64  # the permuted pass makes its own copy
    # A layer whose natural order already compresses well has meaningful order; reordering
    # pays off where the natural order shows little structure (arbitrary neuron order).
    natural_poor = not candidates or candidates[0].params > _PERMUTE_IF_RATIO_ABOVE * m * n
    if (permute is True or (permute == "auto" and natural_poor)) and can_permute:
        # The ordering needs no float64 accuracy; float32 halves its working copies.
        points = w.astype(np.float32, copy=False)
        row_perm = pca_order(points, leaf_size, rng)
        col_perm = pca_order(points.T, leaf_size, rng)
        wp = w[np.ix_(row_perm, col_perm)].astype(np.float64)
        candidates.append(_compress_in_order(wp, w.dtype, budget2, leaf_size, rng, row_perm, col_perm))
    best = min(candidates, key=lambda c: _stored_bytes(c, w.dtype.itemsize))
    if best.blocks is None:
        best.blocks = [Block(BlockKind.DENSE, 0, m, 0, n, dense=w.copy())]
    certified = np.sqrt(best.err2) * (1 + _CERT_MARGIN)
    assert certified <= tol * norm, f"Bug: certified error {certified} exceeds tol*||W|| {tol * norm}"
    info = {"seconds": time.perf_counter() - started, "candidates": [c.params for c in candidates]}
    return HMatrix((m, n), w.dtype, tuple(best.blocks), norm, float(certified), float(tol), best.row_perm, best.col_perm, info)
