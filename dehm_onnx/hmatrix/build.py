"""compress(): adaptive H-matrix construction in few bytes, with a global, certified error budget.

Given ``W`` (m x n), ``tol`` and the storages allowed (``precision``), find a tiling of (a
row/column permutation of) ``W`` into zero, dense and low-rank leaves, and a storage for every
array (``storage.py``: the weight's dtype, float16, int8 or int4 with groupwise scales), that
takes few bytes (payload + scales + a layout row per stored block or tier) while

    ||W - W_H||_F <= tol * ||W||_F,

a bound measured on the stored, dequantized values before the result is returned.

Algorithm ("dynamic error-bounded" refinement, arXiv:2409.07028, made global and extended to
storage precision):

1. Cluster trees over rows and columns by bisection (optionally after a PCA reordering);
   the block tree pairs them, down to ``leaf_size``. Leaves are then split further, down to
   ``min_leaf``, where their children look cheaper (banded filterbanks, a kernel's diagonal).
2. Every block of the tree gets its singular spectrum: exact (batched LAPACK) for small
   blocks, a randomized range finder of growing width for large ones, so the cost grows
   about as ``m * n`` times the ranks involved.
3. Planning: the error budget is spent globally. For a price ``lam`` of squared error, each
   block takes the cheapest of zero, low-rank of rank k, dense, or its children, by
   ``bytes + lam * error`` (a bottom-up pass over the tree). A low-rank block's singular
   vector ``j`` costs, for its ``U`` column and its ``Vt`` row separately, the cheapest format
   by ``bytes_f + lam * rho_f * sigma_j^2`` (``costs.py``; ``rho_f`` calibrated on a few blocks
   of each level), so the storage may change along the rank; a dense block takes its cheapest
   format with the weight's own measured quantization error (``costs.DenseErrorTable``).
   Bisection on ``lam`` finds the fewest bytes whose estimated squared error fits
   ``tol^2 ||W||_F^2``.
4. Storage (``refine.py``): on the planned leaves only, errors of every format are measured on
   the actual factors and blocks; a second price bisection picks each leaf's rank, its tiers
   (consecutive singular vectors sharing one storage, by dynamic programming with a layout row
   per tier) and each dense leaf's format; the arrays are stored and every block's error is
   measured in float64 on the dequantized values, and the budget still unspent is spent on
   cheaper choices that are each measured before they are kept. The sum of the measured
   errors is the certified error; if it breaks the budget, the storage step (then the plan)
   runs again with less of it.

With ``precision="float"`` the only storage is the weight's dtype and this is the engine of
before, counting bytes (values times itemsize plus layout rows) instead of values.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, InvalidWeightError
from .cluster import pca_order, split_sizes
from .hmatrix import INDEX_NBYTES, Block, BlockKind, HMatrix
from . import refine
from .costs import CostModel, DenseErrorTable, formats_for
from .lowrank import Spectrum, exact_spectra, randomized_spectrum, tail_energy
from .storage import Storage, store

__all__ = ["compress", "DEFAULT_LEAF_SIZE", "DEFAULT_BLOCK_OVERHEAD"]

DEFAULT_LEAF_SIZE = 32
DEFAULT_MIN_LEAF = 4
# Leaves tried for smaller children before all of a level's candidates are.
_GROW_SAMPLE = 32
# Bytes counted per layout row: about one row of a packed layout (v1 has 7 int64 columns).
DEFAULT_BLOCK_OVERHEAD = 64
# Blocks at most this small (in min(rows, cols)) get an exact SVD, larger ones a randomized
# range finder; matrices whose full SVD costs at most _EXACT_FLOPS get exact SVDs throughout.
_EXACT_MAX_SIDE = 64
_EXACT_FLOPS = 2**27
_STACK_ELEMENTS = 2**22
# permute="auto" tries a PCA reordering only when the natural order stores more than this
# fraction of the dense values.
_PERMUTE_IF_RATIO_ABOVE = 0.5
# Relative safety margins for floating-point summation of the certified error.
_CERT_MARGIN = 1e-9
# Structure must pay for its blocks: a block tree that stores less than this fraction fewer
# bytes than the whole weight as one dense block in one storage is not worth its extra nodes
# (a Gaussian weight mixed over 211 int4/int8 blocks saves 0.2 % against one int8 block, and
# runs as 211 kernels instead of one).
_STRUCTURE_MIN_SAVING = 0.02
_FLOAT_DTYPES = (np.float16, np.float32, np.float64)
_LOWRANK, _DENSE, _SUB = 0, 1, 2
_MAX_PRICE = 1e15


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
    parent: np.ndarray  # index of the parent in the previous level (-1 for the root)
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
    blocks, parents = [(0, m, 0, n)], [-1]
    levels = []
    while blocks:
        child_range, nxt, nxt_parents = [], [], []
        for i, (r0, r1, c0, c1) in enumerate(blocks):
            rs, cs = _children(r0, r1, row_leaf), _children(c0, c1, col_leaf)
            if len(rs) == 1 and len(cs) == 1:
                child_range.append((-1, -1))
                continue
            start = len(nxt)
            nxt += [(a, b, c, d) for a, b in rs for c, d in cs]
            nxt_parents += [i] * (len(nxt) - start)
            child_range.append((start, len(nxt)))
        arr = np.array(blocks, dtype=np.int64)
        ranges = np.array(child_range, dtype=np.int64)
        levels.append(_Level(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3], ranges[:, 0], ranges[:, 1], np.array(parents, dtype=np.int64)))
        blocks, parents = nxt, nxt_parents
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


def _split_small(r0: int, r1: int, c0: int, c1: int, min_leaf: int) -> list[tuple[int, int, int, int]]:
    """Children of a block below the uniform leaf size: bisect each side longer than ``min_leaf``."""
    rs = _children(r0, r1, min_leaf)
    cs = _children(c0, c1, min_leaf)
    return [(a, b, c, d) for a, b in rs for c, d in cs]


def _grow_small_blocks(levels: list[_Level], w: np.ndarray, budget2: float, min_leaf: int, overhead_params: float) -> None:
    """Split the tree's leaves further, down to ``min_leaf``, where the children look cheaper.

    Leaves are small, so the spectra of their children are exact. A leaf whose fair-share
    estimate (``_fair_share_params``) needs more than rank 2 gets children; they are kept when
    their estimates plus ``overhead_params`` per non-zero child undercut the parent's, and the
    same is tried on the kept ones. A level first tries an evenly spread sample of its candidates and goes
    on only if some of them pay. Smooth blocks stop at once, unstructured ones after a sample;
    banded blocks (filterbanks) and blocks on a kernel's diagonal go down to small leaves.
    Kept children are appended to the next level (contiguous per parent).
    """
    total = w.shape[0] * w.shape[1]
    depth = 0
    while depth < len(levels):
        level = levels[depth]
        depth += 1
        own = _fair_share_params(level, budget2, total)
        leaf = level.child_start < 0
        splittable = (level.rows > min_leaf) | (level.cols > min_leaf)
        candidates = np.flatnonzero(leaf & splittable & (own > 2 * (level.rows + level.cols)))
        if not len(candidates):
            continue
        sample = candidates[_spread(len(candidates), _GROW_SAMPLE)]
        found = _try_children(level, sample, own, w, budget2, min_leaf, overhead_params)
        if found is None:
            continue  # children of an evenly spread sample never paid: unstructured blocks
        if len(candidates) > len(sample):
            found = _try_children(level, candidates, own, w, budget2, min_leaf, overhead_params)
        if found is not None:
            _append_children(levels, depth, level, *found)


def _spread(count: int, most: int) -> np.ndarray:
    """Up to ``most`` indices evenly spread over ``range(count)``."""
    return np.unique(np.linspace(0, count - 1, min(count, most)).astype(np.int64))


def _try_children(level: _Level, candidates: np.ndarray, own: np.ndarray, w: np.ndarray, budget2: float, min_leaf: int, overhead_params: float):
    """The children of ``candidates`` with exact spectra, and which parents they pay for (or None)."""
    total = w.shape[0] * w.shape[1]
    blocks, parent = [], []
    for i in candidates.tolist():
        kids = _split_small(int(level.r0[i]), int(level.r1[i]), int(level.c0[i]), int(level.c1[i]), min_leaf)
        blocks += kids
        parent += [i] * len(kids)
    arr = np.array(blocks, dtype=np.int64)
    none = np.full(len(arr), -1, dtype=np.int64)
    trial = _Level(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3], none, none.copy(), np.array(parent))
    _fill_spectra(trial, w, budget2, None, True, None)
    kids = _fair_share_params(trial, budget2, total)
    kids_cost = np.bincount(trial.parent, weights=kids + overhead_params * (kids > 0), minlength=len(own))
    keep_parent = np.zeros(len(own), dtype=bool)
    keep_parent[candidates] = kids_cost[candidates] < own[candidates] + overhead_params
    return (trial, keep_parent) if keep_parent.any() else None


def _append_children(levels: list[_Level], depth: int, parent_level: _Level, trial: _Level, keep_parent: np.ndarray) -> None:
    """Append the children of the kept parents (rows of ``trial``) to ``levels[depth]``."""
    kept = keep_parent[trial.parent]
    if depth == len(levels):
        empty = np.zeros(0, dtype=np.int64)
        levels.append(_Level(empty, empty, empty, empty, empty, empty, empty, np.zeros((0, 1)), []))
    child = levels[depth]
    offset = len(child.r0)
    parents = trial.parent[kept]  # ascending, contiguous per parent
    ids = np.flatnonzero(keep_parent)
    starts = offset + np.searchsorted(parents, ids)
    parent_level.child_start[ids] = starts
    parent_level.child_end[ids] = np.append(starts[1:], offset + len(parents))
    width = max(child.tails.shape[1], trial.tails.shape[1])
    pad = lambda t: np.hstack([t, np.full((len(t), width - t.shape[1]), np.inf)])  # noqa: E731
    child.tails = np.vstack([pad(child.tails), pad(trial.tails[kept])])
    child.spectra = list(child.spectra) + [sp for sp, k in zip(trial.spectra, kept) if k]
    for name in ("r0", "r1", "c0", "c1", "parent"):
        setattr(child, name, np.concatenate([getattr(child, name), getattr(trial, name)[kept]]))
    minus = np.full(int(kept.sum()), -1, dtype=np.int64)
    child.child_start = np.concatenate([child.child_start, minus])
    child.child_end = np.concatenate([child.child_end, minus])


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

# Planning assumes a Vt stored in integers spreads its per-column scales over this many rows.
_PLAN_VT_ROWS = 8


def _attach_costs(level: _Level, model: CostModel, table: DenseErrorTable | None) -> None:
    """Bytes and error estimates of every format for the blocks of a level (price-independent).

    ``level.rho_u``/``rho_v`` must be set (``_calibrate``).
    """
    level.col_env = _Envelope(model.column_bytes(level.rows), level.rho_u)
    level.row_env = _Envelope(model.row_bytes(level.cols, _PLAN_VT_ROWS), level.rho_v)
    level.dense_bytes = model.dense_bytes(level.rows, level.cols) + model.overhead
    if table is None:
        level.dense_err = np.zeros_like(level.dense_bytes)
    else:
        level.dense_err = table.errors(level.r0, level.r1, level.c0, level.c1)
    t = level.tails
    known = np.isfinite(t[:, 1:])
    level.energy = np.where(known, t[:, :-1] - np.where(known, t[:, 1:], 0.0), 0.0)


# Blocks per level whose factors calibrate the planning error model, and the vectors used.
_CALIBRATION_BLOCKS = 8
_CALIBRATION_RANK = 6


def _calibrate(levels: list[_Level], w: np.ndarray, model: CostModel) -> None:
    """Set each level's ``rho_u``/``rho_v``: the model's ``rho_f`` scaled to what its factors show.

    Singular vectors of smooth or sparse blocks quantize far better than Gaussian data (often
    5-20x less squared error), so the planner would over-protect them. A few blocks of each
    level (evenly spread over those with a spectrum) are factored and stored in every format
    (all levels in one batch); the ratio of measured to modelled error rescales ``rho_f``.
    """
    samples = []  # (level, leaf, energy)
    for level in levels:
        level.rho_u = level.rho_v = model.rho
        if model.float_only:
            continue
        known = [i for i in range(len(level.r0)) if level.spectra[i] is not None and level.tails[i, 0] > 0]
        for j in _spread(len(known), _CALIBRATION_BLOCKS).tolist():
            i = known[j]
            spectrum = level.spectra[i]
            rank = int(min(_CALIBRATION_RANK, np.count_nonzero(spectrum.s > 0), _useful_rank(int(level.rows[i]), int(level.cols[i]))))
            if rank < 1:
                continue
            r0, r1, c0, c1 = (int(a[i]) for a in (level.r0, level.r1, level.c0, level.c1))
            u0, sv, vt0 = _triplets(spectrum, w[r0:r1, c0:c1], rank)
            samples.append((level, refine.lowrank_leaf(0, r0, r1, c0, c1, u0, sv, vt0, level.tails[i]), float(np.sum(sv**2))))
    if not samples:
        return
    refine.prepare_leaves([leaf for _, leaf, _ in samples], [], model, None)
    for level in levels:
        mine = [(leaf, e) for lv, leaf, e in samples if lv is level]
        energy = sum(e for _, e in mine)
        if not mine or energy <= 0.0:
            continue
        rho = []
        for side in ("eu", "ev"):
            total = sum(getattr(leaf, side).sum(axis=0) for leaf, _ in mine)
            with np.errstate(invalid="ignore", divide="ignore"):
                ratio = np.clip(total / (energy * model.rho), 0.01, 4.0)
            rho.append(np.where(np.isfinite(total), model.rho * np.where(np.isfinite(ratio), ratio, 1.0), np.inf))
        level.rho_u, level.rho_v = rho


class _Envelope:
    """Cheapest format of one vector's factor as a function of ``x = lam * sigma^2``.

    For a block whose factor costs ``bytes_f`` in format ``f`` and adds ``rho_f * sigma^2`` of
    error, ``min_f bytes_f + x * rho_f`` is the lower envelope of a few lines; it is built once
    per distinct byte row (blocks of one shape share it) and looked up by ``searchsorted``.
    """

    def __init__(self, nbytes: np.ndarray, rho: np.ndarray):
        self.nbytes, self.rho = nbytes, rho
        keys, self.group = np.unique(nbytes, axis=0, return_inverse=True)
        self.group = self.group.ravel()
        self.lines = [self._hull(row, rho) for row in keys]

    @staticmethod
    def _hull(nbytes: np.ndarray, rho: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Breakpoints (ascending x) and the format used before each and after the last."""
        order = sorted(range(len(rho)), key=lambda f: (nbytes[f], rho[f]))
        formats, breaks = [order[0]], []
        for f in order[1:]:
            # Only a finer (smaller rho) line can take over at larger x.
            while formats:
                g = formats[-1]
                if rho[f] >= rho[g]:
                    break
                x = (nbytes[f] - nbytes[g]) / (rho[g] - rho[f])
                if breaks and x <= breaks[-1]:
                    formats.pop()
                    breaks.pop()
                    continue
                formats.append(f)
                breaks.append(x)
                break
            else:
                formats.append(f)
        return np.array(breaks), np.array(formats)

    def choose(self, x: np.ndarray) -> np.ndarray:
        """``(blocks, k)`` format index for ``x`` of the same shape."""
        out = np.empty(x.shape, dtype=np.int64)
        for g, (breaks, formats) in enumerate(self.lines):
            rows = self.group == g
            out[rows] = formats[np.searchsorted(breaks, x[rows], side="right")]
        return out


@dataclass(eq=False)
class _Choice:
    """Per-level decisions of one bottom-up pass at a given error price."""

    kind: list[np.ndarray]
    rank: list[np.ndarray]
    nbytes: float
    err2: float


def _vector_costs(lv: _Level, model: CostModel, lam: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(blocks, kmax)`` cost, bytes and estimated error of keeping each singular vector.

    Each vector's ``U`` column and ``Vt`` row take the format minimising
    ``bytes + lam * rho_f * sigma^2`` (``CostModel``).
    """
    if model.float_only:
        nbytes = np.broadcast_to(lv.col_env.nbytes + lv.row_env.nbytes, lv.energy.shape)
        err = (lv.rho_u[0] + lv.rho_v[0]) * lv.energy
        with np.errstate(over="ignore"):
            return nbytes + lam * err, nbytes, err
    with np.errstate(over="ignore"):
        x = lam * lv.energy
    iu, iv = lv.col_env.choose(x), lv.row_env.choose(x)
    rows = np.arange(len(iu))[:, None]
    nbytes = lv.col_env.nbytes[rows, iu] + lv.row_env.nbytes[rows, iv]
    err = lv.energy * (lv.rho_u[iu] + lv.rho_v[iv])
    with np.errstate(over="ignore", invalid="ignore"):
        return nbytes + lam * err, nbytes, err


def _rank_costs(lv: _Level, model: CostModel, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """``(blocks, kmax + 1)`` bytes and estimated squared error of each block at rank ``k``.

    With the weight's dtype as the only storage these do not depend on the price and are
    computed once per level.
    """
    if model.float_only and getattr(lv, "fixed_costs", None) is not None and lv.fixed_costs[0] is model:
        return lv.fixed_costs[1]
    _, vbytes, verr = _vector_costs(lv, model, lam)
    zero = np.zeros((len(lv.r0), 1))
    layout = np.full(lv.tails.shape[1], model.overhead)
    layout[0] = 0.0  # a zero block stores nothing
    with np.errstate(invalid="ignore"):
        out = (np.hstack([zero, np.cumsum(vbytes, axis=1)]) + layout, np.hstack([zero, np.cumsum(verr, axis=1)]) + lv.tails)
    if model.float_only:
        lv.fixed_costs = (model, out)
    return out


def _choose(levels: list[_Level], lam: float, model: CostModel) -> _Choice:
    """Bottom-up: each block picks the cheapest of low-rank(k) (k=0: zero), dense, children."""
    kinds, ranks = [None] * len(levels), [None] * len(levels)
    below_cost = below_bytes = below_err = None
    for depth in range(len(levels) - 1, -1, -1):
        lv = levels[depth]
        cum_bytes, cum_err = _rank_costs(lv, model, lam)
        with np.errstate(over="ignore", invalid="ignore"):
            lowrank_cost = cum_bytes + lam * cum_err
        k = np.argmin(np.where(np.isnan(lowrank_cost), np.inf, lowrank_cost), axis=1)
        rows_idx = np.arange(len(k))
        lr_cost = lowrank_cost[rows_idx, k]
        with np.errstate(over="ignore", invalid="ignore"):
            dense_all = lv.dense_bytes + lam * lv.dense_err
        fmt = np.argmin(dense_all, axis=1)
        dense_cost = dense_all[rows_idx, fmt]
        use_dense = dense_cost < lr_cost
        cost = np.where(use_dense, dense_cost, lr_cost)
        nbytes = np.where(use_dense, lv.dense_bytes[rows_idx, fmt], cum_bytes[rows_idx, k])
        err = np.where(use_dense, lv.dense_err[rows_idx, fmt], cum_err[rows_idx, k])
        kind = np.where(use_dense, _DENSE, _LOWRANK)
        has = lv.child_start >= 0
        if has.any():
            below = levels[depth + 1].parent
            sums = lambda values: np.bincount(below, weights=values, minlength=len(lv.r0))[has]  # noqa: E731
            sub_cost = sums(below_cost)
            better = sub_cost < cost[has] * (1 - 1e-12)
            pick = np.flatnonzero(has)[better]
            cost[pick] = sub_cost[better]
            nbytes[pick] = sums(below_bytes)[better]
            err[pick] = sums(below_err)[better]
            kind[pick] = _SUB
        kinds[depth], ranks[depth] = kind, k
        below_cost, below_bytes, below_err = cost, nbytes, err
    return _Choice(kinds, ranks, float(below_bytes[0]), float(below_err[0]))


def _allocate(levels: list[_Level], budget2: float, model: CostModel) -> _Choice:
    """The cheapest choice whose estimated squared error fits ``budget2`` (bisection on the price)."""
    total2 = sum(float(lv.tails[0, 0]) for lv in levels[:1])
    lo, hi = 1e-6 / total2, 1.0 / budget2
    best = _choose(levels, hi, model)
    # Prices stay below one byte per 1e-15 of the budget, so bytes + lam * error never overflows.
    while best.err2 > budget2 and hi < _MAX_PRICE / budget2:
        lo, hi = hi, hi * 1e3
        best = _choose(levels, hi, model)
    if best.err2 > budget2:
        return best  # only dense everywhere remains; the caller certifies it
    for _ in range(48):
        mid = np.sqrt(lo * hi)
        trial = _choose(levels, mid, model)
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


# --------------------------------------------------------------------------- leaves -> stored blocks


def _leaf_set(levels, leaves, w64, model: CostModel, table) -> refine.LeafSet:
    """The leaves with their factors (low-rank) or data (dense), errors of every format measured."""
    lowrank, dense = [], []
    for pos, leaf in enumerate(leaves):
        lv = levels[leaf.depth]
        r0, r1, c0, c1 = (int(a[leaf.index]) for a in (lv.r0, lv.r1, lv.c0, lv.c1))
        part = w64[r0:r1, c0:c1]
        if leaf.kind == _DENSE:
            dense.append((refine.dense_leaf(pos, r0, r1, c0, c1, part), part))
            continue
        tails = lv.tails[leaf.index]
        if leaf.rank == 0:
            empty_u, empty_v = np.zeros((r1 - r0, 0)), np.zeros((0, c1 - c0))
            lowrank.append(refine.lowrank_leaf(pos, r0, r1, c0, c1, empty_u, np.zeros(0), empty_v, tails))
            continue
        u0, s, vt0 = _triplets(lv.spectra[leaf.index], part, _refine_rank(leaf.rank, tails, model))
        lowrank.append(refine.lowrank_leaf(pos, r0, r1, c0, c1, u0, s, vt0, tails))
    return refine.prepare_leaves(lowrank, dense, model, table)


def _refine_rank(rank: int, tails: np.ndarray, model: CostModel) -> int:
    """Rank offered to the storage step: the planned one, plus headroom when storage is coarse.

    Quantized factors may pay for a few more singular vectors than the float plan kept (their
    rounding takes budget that the extra vectors give back), so the storage step may pick any
    rank up to about a quarter more where the spectrum is known.
    """
    if model.float_only:
        return rank
    known = int(np.count_nonzero(np.isfinite(tails))) - 1
    return max(rank, min(known, rank + max(2, rank // 4)))


def _triplets(spectrum: Spectrum, part: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The leading ``rank`` singular triplets of a block (kept, or by exact SVD)."""
    if spectrum.u is not None:
        return spectrum.u[:, :rank], spectrum.s[:rank], spectrum.vt[:rank]
    u, s, vt = np.linalg.svd(part, full_matrices=False)
    return u[:, :rank], s[:rank], vt[:rank]


@dataclass(eq=False)
class _Candidate:
    blocks: list | None  # None: the whole weight, dense
    err2: float
    nbytes: float
    row_perm: np.ndarray | None
    col_perm: np.ndarray | None

    @property
    def params(self) -> int:
        """Stored values (the whole weight for the unchanged candidate)."""
        if self.blocks is None:
            return 1 << 62
        return sum(b.params for b in self.blocks)


def _layout_nbytes(blocks: list[Block], overhead: int, row_perm, col_perm) -> int:
    index = sum(p.size for p in (row_perm, col_perm) if p is not None)
    rows = sum(b.layout_rows for b in blocks)  # zero blocks take none
    return sum(b.nbytes for b in blocks) + overhead * rows + INDEX_NBYTES * index


def _uniform_dense(w: np.ndarray, model: CostModel, budget2: float, beat: float) -> _Candidate | None:
    """The whole weight as one dense block in the format that takes fewest bytes within the
    budget (measured on the stored values), if that takes fewer than ``beat`` bytes; else None.

    Formats are tried from the cheapest, so a weight usually costs one or two stores.
    """
    m, n = w.shape
    predicted = model.dense_bytes(np.array([m]), np.array([n]))[0] + model.overhead
    for i in np.argsort(predicted, kind="stable"):
        f = model.formats[i]
        if predicted[i] >= beat or f.storage == Storage.FLOAT:
            return None  # the weight unchanged, or the structured plan, is no larger
        stored = store(w, f.storage, dtype=model.dtype, group=f.group, scale_dtype=model.scale_dtype)
        if stored is None:
            continue
        err2 = float(np.sum((w.astype(np.float64) - stored.dequantized().astype(np.float64)) ** 2))
        if err2 <= budget2:
            blocks = [Block(BlockKind.DENSE, 0, m, 0, n, storage=(stored,))]
            return _Candidate(blocks, err2, _layout_nbytes(blocks, int(model.overhead), None, None), None, None)
    return None


def _compress_in_order(wp, model: CostModel, budget2, leaf_size, min_leaf, rng, row_perm, col_perm) -> _Candidate:
    """Compress ``wp`` (float64 W, already in the order ``row_perm``/``col_perm``) within ``budget2``."""
    unchanged = _Candidate(None, 0.0, float(wp.size * model.dtype.itemsize), None, None)
    levels = _block_tree(*wp.shape, leaf_size)
    all_exact = wp.shape[0] * wp.shape[1] * min(wp.shape) <= _EXACT_FLOPS
    estimate = None
    for level in reversed(levels):
        _fill_spectra(level, wp, budget2, rng, all_exact, estimate)
        estimate = _subtree_estimate(level, estimate, budget2, wp.size)
    _grow_small_blocks(levels, wp, budget2, min(min_leaf, leaf_size), model.overhead / model.dtype.itemsize)
    table = None if model.float_only else DenseErrorTable(wp, model)
    _calibrate(levels, wp, model)
    best = _plan_and_store(levels, wp, model, table, budget2, row_perm, col_perm)
    if (best is None or best.nbytes >= unchanged.nbytes) and model.overhead > 0:
        # The price bisection only reaches the convex hull of (bytes, error); counting layout
        # rows can leave nothing on it between "unchanged" and a plan that breaks the budget
        # (e.g. a 3 % saving spread over 27 blocks). Planned without them, such a plan is
        # found; it is kept if it is still smaller once its layout is counted.
        best = _plan_and_store(levels, wp, model.without_overhead(), table, budget2, row_perm, col_perm, int(model.overhead))
    return best if best is not None and best.nbytes < unchanged.nbytes else unchanged


def _plan_and_store(levels, wp, model: CostModel, table, budget2, row_perm, col_perm, overhead=None) -> _Candidate | None:
    """Plan the structure, choose the storage, store and measure; None if nothing fits."""
    for level in levels:
        _attach_costs(level, model, table)
    overhead = int(model.overhead) if overhead is None else overhead
    # The plan rests on estimates; the storage step measures. If even the most accurate storage
    # of the planned leaves breaks the budget, plan again with less of it.
    for shrink in (1.0, 0.5, 0.25, 0.1, 0.01):
        choice = _allocate(levels, budget2 * shrink, model)
        if choice.err2 > budget2 * shrink:
            return None
        leaves = _leaf_set(levels, _leaves(levels, choice), wp, model, table)
        target = budget2
        for _ in range(4):
            decision = refine.choose_storage(leaves, target)
            if decision is None:
                break
            blocks, err2 = refine.materialize(leaves, decision, wp, budget2)
            if err2 <= budget2:
                nbytes = _layout_nbytes(blocks, overhead, row_perm, col_perm)
                return _Candidate(blocks, err2, nbytes, row_perm, col_perm)
            target *= max(0.25, min(0.98, budget2 / err2))
    return None


def compress(
    w,
    tol: float,
    *,
    seed: int = 0,
    leaf_size: int = DEFAULT_LEAF_SIZE,
    min_leaf: int = DEFAULT_MIN_LEAF,
    permute="auto",
    precision: str = "float",
    group="auto",
    scale_dtype=None,
    block_overhead: int = DEFAULT_BLOCK_OVERHEAD,
) -> HMatrix:
    """Compress a weight into an H-matrix with ``||W - W_H||_F <= tol * ||W||_F``, in few bytes.

    Args:
        w: 2-D float16/32/64 array. Computation is in float64.
        tol: relative Frobenius tolerance in (0, 1).
        seed: seed of every random choice (range finders, PCA); equal seeds give equal results.
        leaf_size: the block tree bisects every block down to this many rows/columns.
        min_leaf: below ``leaf_size``, blocks are split further, down to this size, only
            where their children look cheaper (banded weights, a kernel's diagonal).
        permute: ``False`` keeps the natural order; ``True`` reorders rows and columns by
            recursive PCA bisection; ``"auto"`` tries both and keeps the smaller in bytes
            (a permutation costs 8 bytes an index).
        precision: the cheapest storage allowed: ``"float"`` (the weight's dtype only),
            ``"fp16"``, ``"int8"``, ``"int4"`` or ``"auto"`` (every storage); see ``costs.py``.
        group: rows per scale group of integer arrays: one of 16, 32, 64, 128, or ``"auto"``
            (each array picks its own).
        scale_dtype: dtype of the integer scales; default the weight's dtype (onnxruntime's
            MatMulNBits fusion wants the activation dtype).
        block_overhead: bytes counted per layout row (per dense block and per low-rank tier;
            zero blocks store nothing) when comparing choices; ``HMatrix.nbytes`` counts it too.

    Returns:
        An HMatrix whose ``certified_error`` bounds ``||W - W_H||_F`` for the dequantized stored
        values and is at most ``tol * ||W||_F``. Its ``nbytes`` is never larger than the dense
        weight's: if nothing is smaller, the result is the weight unchanged (one dense FLOAT block).

    Raises:
        InvalidWeightError: not 2-D, not float16/32/64, empty, or NaN/Inf entries.
        ConfigError: tol outside (0, 1), bad leaf_size, min_leaf, permute, precision, group,
            scale_dtype or block_overhead.
    """
    w = _check_inputs(w, tol)
    if not isinstance(leaf_size, (int, np.integer)) or leaf_size < 1:
        raise ConfigError(f"leaf_size must be a positive integer, got {leaf_size!r}")
    if not isinstance(min_leaf, (int, np.integer)) or min_leaf < 1:
        raise ConfigError(f"min_leaf must be a positive integer, got {min_leaf!r}")
    if permute not in (True, False, "auto"):
        raise ConfigError(f"permute must be True, False or 'auto', got {permute!r}")
    if isinstance(block_overhead, bool) or not isinstance(block_overhead, (int, np.integer)) or block_overhead < 0:
        raise ConfigError(f"block_overhead must be a non-negative integer, got {block_overhead!r}")
    model = CostModel(formats_for(precision, w.dtype, group), w.dtype, _scale_dtype(scale_dtype, w.dtype), int(block_overhead))
    started = time.perf_counter()
    m, n = w.shape
    w64 = w.astype(np.float64)
    norm = float(np.linalg.norm(w64))
    if norm == 0.0:
        blocks = (Block(BlockKind.ZERO, 0, m, 0, n),)
        return HMatrix((m, n), w.dtype, blocks, 0.0, 0.0, float(tol), block_overhead=int(block_overhead))
    budget2 = (tol * norm * (1 - _CERT_MARGIN)) ** 2
    rng = np.random.default_rng(seed)
    candidates = []
    can_permute = max(m, n) > leaf_size
    if permute in (False, "auto") or not can_permute:
        candidates.append(_compress_in_order(w64, model, budget2, leaf_size, min_leaf, rng, None, None))
    del w64  # the permuted pass makes its own copy
    # A layer whose natural order already compresses well has meaningful order; reordering
    # pays off where the natural order shows little structure (arbitrary neuron order).
    # Counted in stored values, not bytes: integer storage alone shrinks any weight 4-8x.
    natural_poor = not candidates or candidates[0].params > _PERMUTE_IF_RATIO_ABOVE * m * n
    if (permute is True or (permute == "auto" and natural_poor)) and can_permute:
        # The ordering needs no float64 accuracy; float32 halves its working copies.
        points = w.astype(np.float32, copy=False)
        row_perm = pca_order(points, leaf_size, rng)
        col_perm = pca_order(points.T, leaf_size, rng)
        wp = w[np.ix_(row_perm, col_perm)].astype(np.float64)
        candidates.append(_compress_in_order(wp, model, budget2, leaf_size, min_leaf, rng, row_perm, col_perm))
    best = min(candidates, key=lambda c: c.nbytes)
    if not model.float_only:
        # Taken unless the structured plan saves _STRUCTURE_MIN_SAVING of its bytes.
        unchanged = w.size * w.dtype.itemsize
        beat = unchanged if best.blocks is None else min(unchanged, best.nbytes / (1 - _STRUCTURE_MIN_SAVING))
        uniform = _uniform_dense(w, model, budget2, beat=beat)
        if uniform is not None:
            best = uniform
    if best.blocks is None:
        best.blocks = [Block(BlockKind.DENSE, 0, m, 0, n, dense=w.copy())]
    certified = np.sqrt(best.err2) * (1 + _CERT_MARGIN)
    assert certified <= tol * norm, f"Bug: certified error {certified} exceeds tol*||W|| {tol * norm}"
    info = {"seconds": time.perf_counter() - started, "candidates": [int(c.nbytes) for c in candidates]}
    return HMatrix(
        (m, n), w.dtype, tuple(best.blocks), norm, float(certified), float(tol), best.row_perm, best.col_perm, info,
        block_overhead=int(block_overhead),
    )


def _scale_dtype(scale_dtype, dtype) -> np.dtype:
    if scale_dtype is None:
        return np.dtype(dtype)
    try:
        out = np.dtype(scale_dtype)
    except TypeError as e:
        raise ConfigError(f"scale_dtype must be float16, float32 or float64, got {scale_dtype!r}") from e
    if out.type not in _FLOAT_DTYPES:
        raise ConfigError(f"scale_dtype must be float16, float32 or float64, got {scale_dtype!r}")
    return out
