"""Storage and rank of each leaf, from exact errors; forming the stored blocks.

The planner (``build.py``) fixes the leaves (their ranges, kinds and largest ranks) from error
*estimates*. This step works on those leaves only, where exact numbers are cheap:

1. Every low-rank leaf of rank ``k`` is written ``B_k = U @ V`` with ``U = U0 diag(s) / c``
   (orthogonal columns of norms ``s_j / c``) and ``V = c Vt0`` (orthonormal rows, times ``c``, a
   power of two near ``sqrt(s_0)`` that keeps both factors in range and changes no rounding).
   Storing column ``j`` of ``U`` in format ``f`` adds ``c^2 ||dU_j||^2`` of squared error and
   storing row ``j`` of ``V`` adds ``(s_j / c)^2 ||dV_j||^2`` (the cross terms with the other
   factor's orthogonality vanish; the products ``dU dV`` and the truncation residual's
   correlation with the rounding are second order). Both are measured by quantizing the actual
   factors in every allowed format. Dense leaves get the exact error of each format (or, above
   ``_EXACT_DENSE_AREA`` entries, the planner's estimate).
2. A price ``lam`` on squared error: each leaf takes the rank ``k' <= k`` and the split of its
   first ``k'`` singular vectors into *tiers* (consecutive vectors sharing one format for ``U``
   and one for ``V``) minimising ``bytes + lam * error`` - dynamic programming over the tier
   ends, each tier paying its layout row and, in integers, its own ``Vt`` scales - and each
   dense leaf its format; bisection on ``lam`` meets the budget and the leftover goes to the
   leaves whose cheaper choice costs the least error per byte saved.
3. The chosen arrays are stored; the squared error of every block is measured in float64 on the
   dequantized values (``Block.u @ Block.vt``, ``Block.dense``) and summed. Budget still left
   is spent on cheaper choices, each measured before it is kept (``_polish``). The caller
   retries with a smaller budget if the sum exceeds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .costs import CostModel, DenseErrorTable, Format
from .hmatrix import Block, BlockKind
from .storage import Storage, store

__all__ = ["LeafSet", "prepare_leaves", "choose_storage", "materialize"]

_EXACT_DENSE_AREA = 2**16
_BISECTION_STEPS = 60
_POLISH_TRIES = 256
_POLISH_AREA = 2
_POLISH_MIN_TRIES = 8
_POLISH_PRICES = 10
_MAX_PRICE = 1e15
_REFITS_PER_LEAF = 4


@dataclass(eq=False)
class _LowRank:
    r0: int
    r1: int
    c0: int
    c1: int
    u: np.ndarray  # (rows, k) U0 diag(s) / c
    v: np.ndarray  # (k, cols) c Vt0
    tails: np.ndarray  # (k + 1,) squared truncation error of rank 0..k
    pos: int = 0  # place of the leaf in the block tree's order
    eu: np.ndarray | None = None  # (k, F) squared error added by storing U's column j in format f
    ev: np.ndarray | None = None  # (k, F)


@dataclass(eq=False)
class _Dense:
    r0: int
    r1: int
    c0: int
    c1: int
    fro2: float
    pos: int = 0
    err: np.ndarray | None = None  # (F,)


@dataclass(eq=False)
class LeafSet:
    """The planner's leaves with what the storage choice needs."""

    lowrank: list  # of _LowRank (rank 0 stands for a zero block)
    dense: list  # of _Dense
    model: CostModel


def _scale_power(s0: float) -> float:
    """A power of two near ``sqrt(s0)`` (1 for a zero spectrum)."""
    if not s0 > 0.0:
        return 1.0
    return float(2.0 ** np.round(0.5 * np.log2(s0)))


def lowrank_leaf(pos, r0, r1, c0, c1, u0: np.ndarray, s: np.ndarray, vt0: np.ndarray, tails: np.ndarray) -> _LowRank:
    """A low-rank leaf from its leading singular triplets (``len(s)`` is the planned rank)."""
    c = _scale_power(float(s[0])) if len(s) else 1.0
    return _LowRank(r0, r1, c0, c1, u0 * (s / c), vt0 * c, tails[: len(s) + 1].copy(), pos)


def dense_leaf(pos, r0, r1, c0, c1, part: np.ndarray) -> _Dense:
    return _Dense(r0, r1, c0, c1, float(np.einsum("ij,ij->", part, part)), pos)


def _format_errors(arrays: list[np.ndarray], f: Format, model: CostModel, axis: int) -> list[np.ndarray]:
    """Squared error of storing each array in ``f``, summed along ``axis`` (0: per column, 1: per row).

    Arrays are quantized side by side, zero-padded at the bottom to a common number of rows
    (the next power of two): groups run down the rows of each column from row 0, so neither
    neighbouring columns nor trailing zero rows change how an array's own rows are stored.
    """
    out = [None] * len(arrays)
    by_rows: dict[int, list[int]] = {}
    for i, a in enumerate(arrays):
        by_rows.setdefault(1 << max(0, int(a.shape[0] - 1).bit_length()), []).append(i)
    for rows, idx in by_rows.items():
        joined = np.zeros((rows, sum(arrays[i].shape[1] for i in idx)))
        start = 0
        for i in idx:
            a = arrays[i]
            joined[: a.shape[0], start : start + a.shape[1]] = a
            start += a.shape[1]
        stored = store(joined, f.storage, dtype=model.dtype, group=f.group, scale_dtype=model.scale_dtype)
        if stored is None:
            for i in idx:
                out[i] = np.full(arrays[i].shape[1 - axis], np.inf)
            continue
        diff = joined - stored.dequantized().astype(np.float64)
        sq = diff * diff
        start = 0
        for i in idx:
            height, width = arrays[i].shape
            out[i] = sq[:height, start : start + width].sum(axis=axis)
            start += width
    return out


def prepare_leaves(lowrank: list[_LowRank], dense: list[tuple[_Dense, np.ndarray]], model: CostModel, table: DenseErrorTable) -> LeafSet:
    """Measure the error of every format on every leaf (see the module docstring)."""
    nf = len(model.formats)
    withrank = [leaf for leaf in lowrank if leaf.u.shape[1]]
    for leaf in lowrank:
        k = leaf.u.shape[1]
        leaf.eu, leaf.ev = np.zeros((k, nf)), np.zeros((k, nf))
    for fi, f in enumerate(model.formats):
        u_err = _format_errors([leaf.u for leaf in withrank], f, model, axis=0)
        v_err = _format_errors([leaf.v for leaf in withrank], f, model, axis=1)
        for leaf, eu, ev in zip(withrank, u_err, v_err):
            c2 = float(leaf.v[0] @ leaf.v[0])  # c^2: the rows of V have norm c
            s_over_c2 = (leaf.u * leaf.u).sum(axis=0)
            leaf.eu[:, fi] = c2 * eu
            leaf.ev[:, fi] = s_over_c2 * ev
    small = [(leaf, part) for leaf, part in dense if part.size <= _EXACT_DENSE_AREA]
    large = [(leaf, part) for leaf, part in dense if part.size > _EXACT_DENSE_AREA]
    for leaf, _ in dense:
        leaf.err = np.zeros(nf)
    for fi, f in enumerate(model.formats):
        if f.storage == Storage.FLOAT:
            continue
        errs = _format_errors([part for _, part in small], f, model, axis=0)
        for (leaf, _), e in zip(small, errs):
            leaf.err[fi] = float(e.sum())
    if large and table is not None:  # without a table every format is FLOAT: exact
        est = table.errors(*(np.array([getattr(leaf, a) for leaf, _ in large]) for a in ("r0", "r1", "c0", "c1")))
        for (leaf, _), e in zip(large, est):
            leaf.err[:] = e
    return LeafSet(lowrank, [leaf for leaf, _ in dense], model)


# --------------------------------------------------------------------------- allocation

# Leaves are grouped by rank into buckets of these upper bounds, padded within a bucket.
_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
ONE_TIER = False  # restrict every low-rank leaf to one storage per factor (for comparisons)


@dataclass(eq=False)
class _Bucket:
    """Low-rank leaves of rank at most ``K``, with the static costs of every tier ``[a, b)``.

    Arrays are ``(leaves, K + 1, K + 1, F)`` over (start ``a``, end ``b``, format ``f``).
    """

    index: np.ndarray  # (Lb,) positions in LeafSet.lowrank
    ranks: np.ndarray  # (Lb,)
    tails: np.ndarray  # (Lb, K + 1), inf beyond a leaf's rank
    ub: np.ndarray  # bytes of U[:, a:b] in format f (payload and scales)
    vb: np.ndarray  # bytes of V[a:b] in format f
    ue: np.ndarray  # squared error added by storing U[:, a:b] in format f
    ve: np.ndarray


def _buckets(leaves: LeafSet) -> list[_Bucket]:
    model = leaves.model
    nf = len(model.formats)
    ranks = np.array([leaf.u.shape[1] for leaf in leaves.lowrank], dtype=np.int64)
    out, low = [], 0
    for high in _BUCKETS:
        idx = np.flatnonzero((ranks > low) & (ranks <= high))
        low = high
        if not len(idx):
            continue
        size = int(ranks[idx].max())
        a = np.arange(size + 1)
        length = (a[None, :] - a[:, None]).astype(np.float64)  # b - a
        valid = length > 0
        rows = np.array([leaves.lowrank[i].r1 - leaves.lowrank[i].r0 for i in idx])
        cols = np.array([leaves.lowrank[i].c1 - leaves.lowrank[i].c0 for i in idx])
        ub = model.column_bytes(rows)[:, None, None, :] * length[None, :, :, None]
        vb = np.stack([model.dense_bytes(length.ravel(), np.full(length.size, c)).reshape(size + 1, size + 1, nf) for c in cols])
        ue = np.empty((len(idx), size + 1, size + 1, nf))
        ve = np.empty_like(ue)
        tails = np.full((len(idx), size + 1), np.inf)
        for j, i in enumerate(idx):
            leaf = leaves.lowrank[i]
            k = leaf.u.shape[1]
            pu = np.zeros((size + 1, nf))
            pv = np.zeros((size + 1, nf))
            pu[1 : k + 1] = np.cumsum(leaf.eu, axis=0)
            pv[1 : k + 1] = np.cumsum(leaf.ev, axis=0)
            pu[k + 1 :], pv[k + 1 :] = pu[k], pv[k]
            with np.errstate(invalid="ignore"):  # inf - inf: a format that cannot store the leaf
                ue[j] = pu[None, :, :] - pu[:, None, :]
                ve[j] = pv[None, :, :] - pv[:, None, :]
            tails[j, : k + 1] = leaf.tails[: k + 1]
        ue[np.isnan(ue)] = np.inf
        ve[np.isnan(ve)] = np.inf
        invalid = ~valid
        if ONE_TIER:
            invalid = invalid | (a[:, None] > 0)
        for arr in (ub, vb):
            arr[:, invalid] = np.inf
        out.append(_Bucket(idx, ranks[idx], tails, ub, vb, ue, ve))
    return out


def _tier_costs(bucket: _Bucket, lam: float, overhead: float):
    """Best format of ``U`` and ``V`` for every tier at price ``lam``: cost, bytes, error, formats."""
    with np.errstate(over="ignore", invalid="ignore"):
        cu = bucket.ub + lam * bucket.ue
        cv = bucket.vb + lam * bucket.ve
    iu = np.argmin(np.where(np.isnan(cu), np.inf, cu), axis=-1)
    iv = np.argmin(np.where(np.isnan(cv), np.inf, cv), axis=-1)
    pick = lambda arr, i: np.take_along_axis(arr, i[..., None], axis=-1)[..., 0]  # noqa: E731
    nbytes = pick(bucket.ub, iu) + pick(bucket.vb, iv) + overhead
    err = pick(bucket.ue, iu) + pick(bucket.ve, iv)
    with np.errstate(over="ignore", invalid="ignore"):
        cost = nbytes + lam * err
    return np.where(np.isnan(cost), np.inf, cost), nbytes, err, iu, iv


def _split(bucket: _Bucket, lam: float, overhead: float):
    """Optimal tiers of every rank prefix (dynamic programming over the tier ends).

    Returns ``(cost, bytes, err, start, iu, iv)``: for each leaf and rank ``b`` the least
    ``bytes + lam * err`` of storing its first ``b`` vectors as consecutive tiers, the start of
    the last tier, and the formats of every tier ``[a, b)``.
    """
    cost_t, bytes_t, err_t, iu, iv = _tier_costs(bucket, lam, overhead)
    count, size = bucket.tails.shape[0], bucket.tails.shape[1] - 1
    if bucket.ub.shape[-1] == 1 or ONE_TIER:
        # One storage per factor: a second tier could only add its layout row.
        start = np.zeros((count, size + 1), dtype=np.int64)
        cost = cost_t[:, 0, :].copy()
        cost[:, 0] = 0.0
        nbytes, err = bytes_t[:, 0, :].copy(), err_t[:, 0, :].copy()
        nbytes[:, 0] = err[:, 0] = 0.0
        return cost, nbytes, err, start, iu, iv
    cost = np.full((count, size + 1), np.inf)
    nbytes = np.zeros((count, size + 1))
    err = np.zeros((count, size + 1))
    start = np.zeros((count, size + 1), dtype=np.int64)
    cost[:, 0] = 0.0
    rows = np.arange(count)
    for b in range(1, size + 1):
        cand = cost[:, :b] + cost_t[:, :b, b]
        a = np.argmin(cand, axis=1)
        cost[:, b] = cand[rows, a]
        nbytes[:, b] = nbytes[rows, a] + bytes_t[rows, a, b]
        err[:, b] = err[rows, a] + err_t[rows, a, b]
        start[:, b] = a
    return cost, nbytes, err, start, iu, iv


@dataclass(eq=False)
class _Decision:
    """One choice for every leaf: rank and tiers per low-rank leaf, format per dense leaf.

    ``dense_option`` is a format index, or ``F`` for "zero". The tiers of low-rank leaf ``i``
    come from the dynamic programme of its bucket (``dp``, kept from ``_decide``) unless
    ``chosen`` holds them.
    """

    rank: np.ndarray  # (L,)
    lowrank_bytes: np.ndarray
    lowrank_err: np.ndarray
    dense_option: np.ndarray  # (D,)
    dense_bytes: np.ndarray
    dense_err: np.ndarray
    dp: dict  # leaf index -> (start, iu, iv, row) of its bucket at the decision's price
    chosen: dict  # leaf index -> explicit tiers
    price: float = 1.0  # the price on squared error the choice was made at

    @property
    def nbytes(self) -> float:
        return float(self.lowrank_bytes.sum() + self.dense_bytes.sum())

    @property
    def err2(self) -> float:
        return float(self.lowrank_err.sum() + self.dense_err.sum())

    def copy(self) -> "_Decision":
        arrays = (np.array(getattr(self, f), copy=True) for f in list(self.__dataclass_fields__)[:6])
        return _Decision(*arrays, dict(self.dp), dict(self.chosen), self.price)

    def tiers(self, i: int) -> list[tuple[int, int, int, int]]:
        """Tiers ``(a, b, format of U, format of V)`` of low-rank leaf ``i`` (empty: zero block)."""
        if i in self.chosen:
            return self.chosen[i]
        rank = int(self.rank[i])
        if rank == 0:
            return []
        start, iu, iv, row = self.dp[i]
        out, b = [], rank
        while b > 0:
            a = int(start[row, b])
            out.append((a, b, int(iu[row, a, b]), int(iv[row, a, b])))
            b = a
        return out[::-1]


def _decide(leaves: LeafSet, buckets: list[_Bucket], dense_bytes: np.ndarray, dense_err: np.ndarray, lam: float) -> _Decision:
    overhead = leaves.model.overhead
    count = len(leaves.lowrank)
    rank = np.zeros(count, dtype=np.int64)
    lr_bytes = np.zeros(count)
    lr_err = np.array([float(leaf.tails[0]) for leaf in leaves.lowrank])
    dp = {}
    for bucket in buckets:
        cost, nbytes, err, start, iu, iv = _split(bucket, lam, overhead)
        size = cost.shape[1] - 1
        ks = np.arange(size + 1)[None, :]
        with np.errstate(over="ignore", invalid="ignore"):
            total = cost + lam * bucket.tails
            total[:, 0] = lam * bucket.tails[:, 0]  # a zero block stores nothing
        total = np.where(np.isnan(total) | (ks > bucket.ranks[:, None]), np.inf, total)
        k = np.argmin(total, axis=1)
        rows = np.arange(len(k))
        rank[bucket.index] = k
        lr_bytes[bucket.index] = np.where(k == 0, 0.0, nbytes[rows, k])
        lr_err[bucket.index] = np.where(k == 0, bucket.tails[:, 0], err[rows, k] + bucket.tails[rows, k])
        for row, i in enumerate(bucket.index.tolist()):
            dp[i] = (start, iu, iv, row)
    with np.errstate(over="ignore", invalid="ignore"):
        dcost = dense_bytes + lam * dense_err
    dpick = np.argmin(dcost, axis=1) if len(dcost) else np.zeros(0, dtype=np.int64)
    drows = np.arange(len(dpick))
    return _Decision(rank, lr_bytes, lr_err, dpick, dense_bytes[drows, dpick], dense_err[drows, dpick], dp, {}, lam)


def _dense_options(leaves: LeafSet) -> tuple[np.ndarray, np.ndarray]:
    """``(D, F + 1)`` bytes and errors of the dense leaves' formats, the last column "zero"."""
    model = leaves.model
    if not leaves.dense:
        return np.zeros((0, len(model.formats) + 1)), np.zeros((0, len(model.formats) + 1))
    rows = np.array([leaf.r1 - leaf.r0 for leaf in leaves.dense])
    cols = np.array([leaf.c1 - leaf.c0 for leaf in leaves.dense])
    nbytes = np.hstack([model.dense_bytes(rows, cols) + model.overhead, np.zeros((len(rows), 1))])
    err = np.vstack([np.append(leaf.err, leaf.fro2) for leaf in leaves.dense])
    return nbytes, err


def choose_storage(leaves: LeafSet, budget2: float) -> _Decision | None:
    """The cheapest choice (bytes) whose estimated squared error fits ``budget2``, or None."""
    buckets = _buckets(leaves)
    dense_bytes, dense_err = _dense_options(leaves)
    decide = lambda lam: _decide(leaves, buckets, dense_bytes, dense_err, lam)  # noqa: E731
    # The most accurate choice: one byte is worth less than 1e-15 of the budget.
    best = decide(_MAX_PRICE / budget2)
    if not best.err2 <= budget2:
        return None
    total = sum(float(leaf.tails[0]) for leaf in leaves.lowrank) + sum(leaf.fro2 for leaf in leaves.dense)
    lo, hi = 1e-6 / max(total, 1e-300), 1.0 / max(budget2, 1e-300)
    trial = decide(hi)
    while trial.err2 > budget2 and hi < _MAX_PRICE / budget2:
        lo, hi = hi, hi * 1e3
        trial = decide(hi)
    if trial.err2 <= budget2:
        best = trial
    else:
        lo = hi
    cheap = decide(lo)
    for _ in range(_BISECTION_STEPS):
        if hi / lo < 1 + 1e-3:
            break
        mid = np.sqrt(lo * hi)
        trial = decide(mid)
        if trial.err2 <= budget2:
            hi, best = mid, trial
        else:
            lo, cheap = mid, trial
    return _spend_leftover(best, cheap, budget2 - best.err2)


def _spend_leftover(best: _Decision, cheap: _Decision, leftover: float) -> _Decision:
    """Take the cheaper solution's choice on the leaves where it saves most bytes per error."""
    out = best.copy()
    moves = []
    for kind, saved, added in (
        ("lowrank", best.lowrank_bytes - cheap.lowrank_bytes, cheap.lowrank_err - best.lowrank_err),
        ("dense", best.dense_bytes - cheap.dense_bytes, cheap.dense_err - best.dense_err),
    ):
        for i in np.flatnonzero(saved > 0):
            moves.append((saved[i] / max(added[i], 1e-300), kind, int(i), float(max(added[i], 0.0))))
    moves.sort(key=lambda t: -t[0])
    for _, kind, i, added in moves:
        if added > leftover:
            continue
        leftover -= added
        if kind == "lowrank":
            out.rank[i], out.chosen[i] = cheap.rank[i], cheap.tiers(i)
            out.lowrank_bytes[i], out.lowrank_err[i] = cheap.lowrank_bytes[i], cheap.lowrank_err[i]
        else:
            out.dense_option[i] = cheap.dense_option[i]
            out.dense_bytes[i], out.dense_err[i] = cheap.dense_bytes[i], cheap.dense_err[i]
    return out


# --------------------------------------------------------------------------- materialize


def _store_or_exact(a: np.ndarray, f: Format, model: CostModel):
    stored = store(a, f.storage, dtype=model.dtype, group=f.group, scale_dtype=model.scale_dtype)
    return stored if stored is not None else store(a, Storage.FLOAT, dtype=model.dtype)


class _Former:
    """Forms the stored block of one leaf for a given choice, with its exact squared error."""

    def __init__(self, leaves: LeafSet, wp: np.ndarray):
        self.leaves, self.wp, self.model = leaves, wp, leaves.model

    def lowrank(self, i: int, tiers: list[tuple[int, int, int, int]]) -> tuple[Block, float]:
        leaf = self.leaves.lowrank[i]
        if not tiers:
            return Block(BlockKind.ZERO, leaf.r0, leaf.r1, leaf.c0, leaf.c1), float(leaf.tails[0])
        arrays = []
        for a, b, fu, fv in tiers:
            arrays.append(_store_or_exact(leaf.u[:, a:b], self.model.formats[fu], self.model))
            arrays.append(_store_or_exact(leaf.v[a:b], self.model.formats[fv], self.model))
        block = Block(BlockKind.LOWRANK, leaf.r0, leaf.r1, leaf.c0, leaf.c1, storage=tuple(arrays))
        part = self.wp[leaf.r0 : leaf.r1, leaf.c0 : leaf.c1]
        return block, _sum_squares(part - block.u.astype(np.float64) @ block.vt.astype(np.float64))

    def dense(self, j: int, option: int) -> tuple[Block, float]:
        leaf = self.leaves.dense[j]
        if option == len(self.model.formats):
            return Block(BlockKind.ZERO, leaf.r0, leaf.r1, leaf.c0, leaf.c1), leaf.fro2
        part = self.wp[leaf.r0 : leaf.r1, leaf.c0 : leaf.c1]
        stored = _store_or_exact(part, self.model.formats[option], self.model)
        block = Block(BlockKind.DENSE, leaf.r0, leaf.r1, leaf.c0, leaf.c1, storage=(stored,))
        return block, _sum_squares(part - block.dense.astype(np.float64))

    def nbytes(self, block: Block) -> float:
        return block.nbytes + self.model.overhead * block.layout_rows


def materialize(leaves: LeafSet, decision: _Decision, wp: np.ndarray, budget2: float | None = None) -> tuple[list[Block], float]:
    """Store every leaf as decided; return the blocks (tree order) and their exact squared error.

    With ``budget2``, budget the estimates left unspent is then spent with exact measurements
    (``_polish``, which sweeps prices below the decision's).
    """
    former = _Former(leaves, wp)
    tiers = [decision.tiers(i) for i in range(len(leaves.lowrank))]
    lowrank = [former.lowrank(i, t) for i, t in enumerate(tiers)]
    dense = [former.dense(j, int(decision.dense_option[j])) for j in range(len(leaves.dense))]
    err2 = sum(e for _, e in lowrank) + sum(e for _, e in dense)
    if budget2 is not None and err2 < budget2:
        err2 = _polish(former, decision, decision.price, tiers, lowrank, dense, budget2 - err2, err2)
    placed = [(leaf.pos, b) for leaf, (b, _) in zip(leaves.lowrank, lowrank)]
    placed += [(leaf.pos, b) for leaf, (b, _) in zip(leaves.dense, dense)]
    placed.sort(key=lambda item: item[0])
    return [block for _, block in placed], err2


def _polish(former: _Former, decision: _Decision, lam: float, tiers: list, lowrank: list, dense: list, leftover: float, err2: float) -> float:
    """Spend the measured leftover on cheaper choices, each measured before it is kept.

    Candidates: what the allocation gives a leaf at lower prices (``lam / 2**(t/2)``: fewer
    vectors, coarser tiers), and every single change of one array's format (the price sweep
    only reaches the convex hull of a leaf's choices; a choice just inside it may still fit).
    They are tried by estimated bytes saved per error added, at most ``_POLISH_TRIES``, and
    beyond the first ``_POLISH_MIN_TRIES`` only while the blocks tried hold at most
    ``_POLISH_AREA`` times the weight's entries; one is kept when the stored block is smaller
    and its measured extra error fits the leftover.
    """
    leaves, model = former.leaves, former.model
    buckets = _buckets(leaves)
    dense_bytes, dense_err = _dense_options(leaves)
    candidates, seen = [], set()
    for t in range(1, _POLISH_PRICES + 1):
        cheaper = _decide(leaves, buckets, dense_bytes, dense_err, lam * 2.0 ** (-t / 2))
        for i in np.flatnonzero(cheaper.lowrank_bytes < decision.lowrank_bytes).tolist():
            option = tuple(cheaper.tiers(i))
            if ("lowrank", i, option) not in seen:
                seen.add(("lowrank", i, option))
                saved = decision.lowrank_bytes[i] - cheaper.lowrank_bytes[i]
                added = cheaper.lowrank_err[i] - decision.lowrank_err[i]
                candidates.append((saved / max(added, 1e-300), "lowrank", i, list(option)))
        for j in np.flatnonzero(cheaper.dense_bytes < decision.dense_bytes).tolist():
            if ("dense", j, int(cheaper.dense_option[j])) not in seen:
                seen.add(("dense", j, int(cheaper.dense_option[j])))
                saved = decision.dense_bytes[j] - cheaper.dense_bytes[j]
                added = cheaper.dense_err[j] - decision.dense_err[j]
                candidates.append((saved / max(added, 1e-300), "dense", j, int(cheaper.dense_option[j])))
    candidates += _format_moves(former, tiers, decision, dense_bytes, dense_err)
    candidates += _refits(former, decision, leftover)
    candidates.sort(key=lambda c: -c[0])
    area = _POLISH_AREA * former.wp.size
    for tries, (_, kind, i, choice) in enumerate(candidates[:_POLISH_TRIES]):
        leaf = leaves.lowrank[i] if kind == "lowrank" else leaves.dense[i]
        area -= (leaf.r1 - leaf.r0) * (leaf.c1 - leaf.c0)
        if area < 0 and tries >= _POLISH_MIN_TRIES:
            break
        current = lowrank[i] if kind == "lowrank" else dense[i]
        trial = former.lowrank(i, choice) if kind == "lowrank" else former.dense(i, choice)
        added = trial[1] - current[1]
        if former.nbytes(trial[0]) < former.nbytes(current[0]) and added <= leftover:
            leftover -= added
            err2 += added
            if kind == "lowrank":
                lowrank[i] = trial
            else:
                dense[i] = trial
    return err2


def _refits(former: _Former, decision: _Decision, leftover: float) -> list:
    """For each low-rank leaf, the cheapest single tiers (rank, format of U, format of V) whose
    estimated error fits the leaf's own error plus the leftover (with 2 % slack: the estimate
    is unbiased but not exact, and a move is measured before it is kept)."""
    model = former.model
    out = []
    for i, leaf in enumerate(former.leaves.lowrank):
        k = leaf.u.shape[1]
        if not k:
            continue
        rows, cols = leaf.r1 - leaf.r0, leaf.c1 - leaf.c0
        ks = np.arange(k + 1)
        zero = np.zeros((1, len(model.formats)))
        cu = np.vstack([zero, np.cumsum(leaf.eu, axis=0)])  # (k + 1, F)
        cv = np.vstack([zero, np.cumsum(leaf.ev, axis=0)])
        with np.errstate(invalid="ignore"):
            err = leaf.tails[: k + 1, None, None] + cu[:, :, None] + cv[:, None, :]
        ub = model.column_bytes(np.array([rows]))[0][None, :] * ks[:, None]
        vb = model.dense_bytes(ks, np.full(k + 1, cols))
        nbytes = model.overhead + ub[:, :, None] + vb[:, None, :]
        nbytes[0] = 0.0
        allowance = (decision.lowrank_err[i] + leftover) * 1.02
        with np.errstate(over="ignore", invalid="ignore"):
            fits = np.where(err <= allowance, nbytes, np.inf)
        flat = fits.ravel()
        for idx in np.argsort(flat, kind="stable")[:_REFITS_PER_LEAF]:
            if not flat[idx] < decision.lowrank_bytes[i]:
                break
            rank, fu, fv = (int(x) for x in np.unravel_index(idx, fits.shape))
            saved = decision.lowrank_bytes[i] - flat[idx]
            added = err[rank, fu, fv] - decision.lowrank_err[i]
            out.append((saved / max(added, 1e-300), "lowrank", i, [(0, rank, fu, fv)] if rank else []))
    return out


def _format_moves(former: _Former, tiers: list, decision: _Decision, dense_bytes, dense_err) -> list:
    """Every change of one array's format (one tier's ``U`` or ``V``, or a dense block)."""
    model = former.model
    out = []
    for i, leaf_tiers in enumerate(tiers):
        leaf = former.leaves.lowrank[i]
        rows, cols = leaf.r1 - leaf.r0, leaf.c1 - leaf.c0
        for t, (a, b, fu, fv) in enumerate(leaf_tiers):
            ubytes = model.column_bytes(np.array([rows]))[0] * (b - a)
            vbytes = model.dense_bytes(np.array([b - a]), np.array([cols]))[0]
            uerr, verr = leaf.eu[a:b].sum(axis=0), leaf.ev[a:b].sum(axis=0)
            for f in range(len(model.formats)):
                for side, nbytes, err, now in (("u", ubytes, uerr, fu), ("v", vbytes, verr, fv)):
                    with np.errstate(invalid="ignore"):
                        saved, added = nbytes[now] - nbytes[f], err[f] - err[now]
                    if f == now or not saved > 0 or not np.isfinite(added):
                        continue
                    option = list(leaf_tiers)
                    option[t] = (a, b, f, fv) if side == "u" else (a, b, fu, f)
                    out.append((saved / max(added, 1e-300), "lowrank", i, option))
    for j, option in enumerate(decision.dense_option.tolist()):
        for f in range(dense_bytes.shape[1]):
            with np.errstate(invalid="ignore"):
                saved, added = dense_bytes[j, option] - dense_bytes[j, f], dense_err[j, f] - dense_err[j, option]
            if f != option and saved > 0 and np.isfinite(added):
                out.append((saved / max(added, 1e-300), "dense", j, f))
    return out


def _sum_squares(a: np.ndarray) -> float:
    value = float(np.einsum("ij,ij->", a, a))
    return value if np.isfinite(value) else np.inf
