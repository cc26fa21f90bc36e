"""The one conformance table for HMatMul: hand-built H-matrices and inputs.

Every case is built from ``dehm_onnx.hmatrix`` types and ``pack`` (never from ``compress``),
so it does not depend on the compression algorithm's choices. The expected result is
``X @ hm.to_dense()`` in float64; every implementation (numpy reference, onnx.reference
OpRun, CPU kernel, emit modes, CUDA kernel) runs the same table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dehm_onnx.hmatrix import Block, BlockKind, HMatrix, Storage, store

__all__ = ["Case", "CASES", "FLOAT_CASES", "expected", "tolerance"]


@dataclass(frozen=True)
class Case:
    name: str
    hm: HMatrix
    x: np.ndarray


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _dense(rng, r0, r1, c0, c1, dtype):
    return Block(BlockKind.DENSE, r0, r1, c0, c1, dense=rng.standard_normal((r1 - r0, c1 - c0)).astype(dtype))


def _lowrank(rng, r0, r1, c0, c1, k, dtype):
    u = rng.standard_normal((r1 - r0, k)).astype(dtype)
    vt = rng.standard_normal((k, c1 - c0)).astype(dtype)
    return Block(BlockKind.LOWRANK, r0, r1, c0, c1, u=u, vt=vt)


def _stored(rng, shape, storage: Storage, dtype, group: int = 16):
    """A random array kept in ``storage`` (values as the engine would store them)."""
    return store(rng.standard_normal(shape), storage, dtype=dtype, group=group)


def _tiered(rng, r0, r1, c0, c1, tiers, dtype):
    """A low-rank block whose tiers are ``[(rank, U storage, U group, Vt storage, Vt group), ...]``."""
    arrays = []
    for k, su, gu, sv, gv in tiers:
        arrays += [_stored(rng, (r1 - r0, k), su, dtype, gu), _stored(rng, (k, c1 - c0), sv, dtype, gv)]
    return Block(BlockKind.LOWRANK, r0, r1, c0, c1, storage=tuple(arrays))


def _qdense(rng, r0, r1, c0, c1, storage, dtype, group=16):
    return Block(BlockKind.DENSE, r0, r1, c0, c1, storage=(_stored(rng, (r1 - r0, c1 - c0), storage, dtype, group),))


def _quantized_cases() -> list[Case]:
    """Blocks in every storage: float16, int8 and int4 with groups of 16..128 rows (partial
    last groups, ranks above a group), tiers of mixed storage, uniform and uneven tilings."""
    f32, f16 = np.float32, np.float16
    F, H, I8, I4 = Storage.FLOAT, Storage.FP16, Storage.INT8, Storage.INT4
    cases = []
    rng = _rng(21)
    blocks = [
        _qdense(rng, 0, 37, 0, 20, I8, f32, 16),
        _tiered(rng, 0, 37, 20, 48, [(1, F, 0, F, 0), (3, H, 0, I8, 16), (20, I4, 16, I4, 16)], f32),
        _tiered(rng, 37, 64, 0, 20, [(2, I8, 32, H, 0), (2, I4, 64, I8, 128)], f32),
        _qdense(rng, 37, 64, 20, 48, I4, f32, 32),
    ]
    hm = _hm((64, 48), blocks, f32, rng.permutation(64), rng.permutation(48))
    cases.append(Case("quantized_tiers", hm, rng.standard_normal((3, 64)).astype(f32)))
    cases.append(Case("quantized_tiers_1d", hm, rng.standard_normal(64).astype(f32)))
    # A uniform 8 x 8 grid of 16-row tiles: block diagonal dense in three storages, low-rank
    # neighbours, larger low-rank blocks above (the batched family's reshape-only tiles).
    rng = _rng(22)
    storages = (H, I8, I4)
    blocks = []
    for i in range(8):
        blocks.append(_qdense(rng, 16 * i, 16 * i + 16, 16 * i, 16 * i + 16, storages[i % 3], f32, 16))
    for i in range(0, 8, 2):
        blocks.append(_tiered(rng, 16 * i, 16 * i + 16, 16 * i + 16, 16 * i + 32, [(1, F, 0, F, 0), (2, H, 0, H, 0)], f32))
        blocks.append(_tiered(rng, 16 * i + 16, 16 * i + 32, 16 * i, 16 * i + 16, [(3, I8, 16, H, 0)], f32))
    for i in range(0, 8, 4):
        blocks.append(_tiered(rng, 16 * i, 16 * i + 32, 16 * i + 32, 16 * i + 64, [(2, I4, 16, I4, 16), (1, F, 0, H, 0)], f32))
        blocks.append(_tiered(rng, 16 * i + 32, 16 * i + 64, 16 * i, 16 * i + 32, [(4, H, 0, I8, 32)], f32))
    blocks.append(_tiered(rng, 0, 64, 64, 128, [(5, I8, 64, I4, 16)], f32))
    blocks.append(_tiered(rng, 64, 128, 0, 64, [(1, F, 0, F, 0), (3, I4, 32, H, 0)], f32))
    hm = _hm((128, 128), blocks, f32)
    cases.append(Case("quantized_grid", hm, rng.standard_normal((5, 128)).astype(f32)))
    cases.append(Case("quantized_grid_3d", hm, rng.standard_normal((2, 3, 128)).astype(f32)))
    # Uneven bisection of 201 x 80 rows (101 + 100, then 51/50 ...): gathered tiles.
    rng = _rng(23)
    blocks = [
        _tiered(rng, 0, 101, 40, 80, [(2, I8, 16, H, 0)], f32),
        _tiered(rng, 101, 201, 0, 40, [(2, I8, 16, H, 0)], f32),
        _tiered(rng, 0, 51, 20, 40, [(1, H, 0, I4, 16)], f32),
        _tiered(rng, 51, 101, 0, 20, [(1, H, 0, I4, 16)], f32),
        _tiered(rng, 101, 152, 60, 80, [(2, F, 0, F, 0)], f32),
        _tiered(rng, 152, 201, 40, 60, [(2, F, 0, F, 0)], f32),
        _qdense(rng, 0, 51, 0, 20, I8, f32, 32),
        _qdense(rng, 51, 101, 20, 40, I8, f32, 32),
        _qdense(rng, 101, 152, 40, 60, I4, f32, 16),
        _qdense(rng, 152, 201, 60, 80, I4, f32, 16),
    ]
    hm = _hm((201, 80), blocks, f32)
    cases.append(Case("quantized_uneven", hm, rng.standard_normal((4, 201)).astype(f32)))
    # A float16 weight: float16 scales.
    rng = _rng(24)
    blocks = [
        _qdense(rng, 0, 32, 0, 32, I8, f16, 16),
        _tiered(rng, 0, 32, 32, 64, [(2, F, 0, I4, 16), (2, I4, 16, F, 0)], f16),
        _tiered(rng, 32, 64, 0, 32, [(3, I8, 32, I8, 16)], f16),
        _qdense(rng, 32, 64, 32, 64, I4, f16, 32),
    ]
    hm = _hm((64, 64), blocks, f16, rng.permutation(64))
    cases.append(Case("quantized_float16", hm, rng.standard_normal((3, 64)).astype(f16)))
    return cases


def _hm(shape, blocks, dtype, row_perm=None, col_perm=None) -> HMatrix:
    return HMatrix(tuple(shape), np.dtype(dtype), tuple(blocks), 1.0, 0.0, 0.1, row_perm, col_perm)


def _hodlr(rng, r0, r1, c0, c1, depth, dtype, leaf_kinds):
    """A two-way split down to ``depth``: low-rank off-diagonal, recursive diagonal."""
    if depth == 0:
        kind = leaf_kinds[(r0 + c0) % len(leaf_kinds)]
        if kind == BlockKind.ZERO:
            return [Block(BlockKind.ZERO, r0, r1, c0, c1)]
        if kind == BlockKind.DENSE:
            return [_dense(rng, r0, r1, c0, c1, dtype)]
        return [_lowrank(rng, r0, r1, c0, c1, min(r1 - r0, c1 - c0), dtype)]  # full-rank low-rank
    rm, cm = (r0 + r1) // 2, (c0 + c1) // 2
    out = _hodlr(rng, r0, rm, c0, cm, depth - 1, dtype, leaf_kinds)
    out.append(_lowrank(rng, r0, rm, cm, c1, 1 + depth % 3, dtype))
    out.append(_lowrank(rng, rm, r1, c0, cm, depth % 2, dtype))  # rank 0 at odd depths
    out += _hodlr(rng, rm, r1, cm, c1, depth - 1, dtype, leaf_kinds)
    return out


def _build_cases() -> list[Case]:
    f32, f16 = np.float32, np.float16
    cases = []
    rng = _rng(1)
    cases.append(Case("dense_only_odd", _hm((5, 3), [_dense(rng, 0, 5, 0, 3, f32)], f32),
                      rng.standard_normal((1, 5)).astype(f32)))
    rng = _rng(2)
    mixed = [
        _dense(rng, 0, 3, 0, 2, f32),
        _lowrank(rng, 0, 3, 2, 5, 2, f32),
        Block(BlockKind.ZERO, 3, 7, 0, 2),
        _lowrank(rng, 3, 7, 2, 5, 1, f32),
    ]
    hm = _hm((7, 5), mixed, f32, rng.permutation(7), rng.permutation(5))
    cases.append(Case("mixed_permuted", hm, rng.standard_normal((3, 7)).astype(f32)))
    rng = _rng(3)
    cases.append(Case("all_zero", _hm((4, 6), [Block(BlockKind.ZERO, 0, 4, 0, 6)], f32),
                      rng.standard_normal((2, 4)).astype(f32)))
    rng = _rng(4)
    zero_rank = [_lowrank(rng, 0, 6, 0, 9, 0, f32), _dense(rng, 6, 11, 0, 9, f32)]
    cases.append(Case("rank0_lowrank", _hm((11, 9), zero_rank, f32), rng.standard_normal((4, 11)).astype(f32)))
    rng = _rng(5)
    full = [_lowrank(rng, 0, 13, 0, 4, 4, f32), _lowrank(rng, 0, 13, 4, 10, 13, f32)]  # k = min and k > min
    cases.append(Case("full_rank_lowrank", _hm((13, 10), full, f32), rng.standard_normal((5, 13)).astype(f32)))
    rng = _rng(6)
    kinds = (BlockKind.DENSE, BlockKind.LOWRANK, BlockKind.ZERO)
    tree = _hodlr(rng, 0, 37, 0, 29, 3, f32, kinds)
    hm = _hm((37, 29), tree, f32, rng.permutation(37), rng.permutation(29))
    cases.append(Case("hodlr_permuted_3d", hm, rng.standard_normal((2, 3, 37)).astype(f32)))
    cases.append(Case("hodlr_empty_batch", hm, np.zeros((0, 37), f32)))
    cases.append(Case("hodlr_empty_3d", hm, np.zeros((2, 0, 37), f32)))
    cases.append(Case("hodlr_1d_x", hm, rng.standard_normal(37).astype(f32)))
    rng = _rng(7)
    wide = _hodlr(rng, 0, 3, 0, 301, 1, f32, kinds)
    cases.append(Case("wide_batch130", _hm((3, 301), wide, f32, None, rng.permutation(301)),
                      rng.standard_normal((130, 3)).astype(f32)))
    rng = _rng(8)
    tall = _hodlr(rng, 0, 300, 0, 4, 2, f32, (BlockKind.LOWRANK, BlockKind.DENSE))
    cases.append(Case("tall_row_perm", _hm((300, 4), tall, f32, rng.permutation(300)),
                      rng.standard_normal((70, 300)).astype(f32)))
    rng = _rng(9)
    tree16 = _hodlr(rng, 0, 45, 0, 33, 2, f16, kinds)
    hm16 = _hm((45, 33), tree16, f16, rng.permutation(45), rng.permutation(33))
    cases.append(Case("float16_hodlr", hm16, rng.standard_normal((6, 45)).astype(f16)))
    hm16b = _hm((45, 33), tree16, f16)
    cases.append(Case("float16_identity_3d", hm16b, rng.standard_normal((2, 65, 45)).astype(f16)))
    # Every rank 1..16 on row counts that are not multiples of 8 (the CPU kernel's narrow-panel
    # product X_b U_b covers ranks below 16 eight rows at a time, then the leftover rows).
    rng = _rng(11)
    stack, r0 = [], 0
    for k in range(1, 17):
        rows = 7 + k
        stack.append(_lowrank(rng, r0, r0 + rows, 0, 19, k, f32))
        r0 += rows
    narrow = _hm((r0, 19), stack, f32)
    cases.append(Case("narrow_ranks_1d", narrow, rng.standard_normal(r0).astype(f32)))
    cases.append(Case("narrow_ranks_batch5", narrow, rng.standard_normal((5, r0)).astype(f32)))
    # Enough multiply-adds (batch x stored values >= 2^19) for the kernel's multi-task paths.
    for dtype, batch, name in ((f32, 5, "parallel_rows"), (f16, 6, "parallel_rows_float16"),
                               (f32, 20, "parallel_batch_major")):
        rng = _rng(10)
        blocks = [_dense(rng, 0, 530, 0, 301, dtype), _lowrank(rng, 0, 530, 301, 333, 7, dtype),
                  _lowrank(rng, 530, 601, 0, 333, 3, dtype)]
        hm = _hm((601, 333), blocks, dtype, rng.permutation(601), rng.permutation(333))
        cases.append(Case(name, hm, rng.standard_normal((batch, 601)).astype(dtype)))
        if batch == 5:
            # One row and an 800 KB payload (wide dense block, rank-7 blocks): the one-row pass.
            cases.append(Case("large_payload_1d", hm, rng.standard_normal(601).astype(dtype)))
    return cases + _quantized_cases()


CASES = _build_cases()
# Cases whose arrays are all stored in the weight's dtype (what packed layout v1 holds exactly).
FLOAT_CASES = [c for c in CASES if all(b.is_float for b in c.hm.blocks)]


def expected(case: Case) -> np.ndarray:
    """``X @ W_H`` in float64 from the dense reconstruction."""
    return case.x.astype(np.float64) @ case.hm.to_dense()


def tolerance(case: Case) -> np.ndarray:
    """Elementwise bound: float accumulation error plus one rounding to the output dtype.

    The terms are bounded by ``(|X| @ |U|) @ |Vt|`` per block, so we scale by the dense
    product of absolute values of every factor (exact factors: no approximation error).
    """
    x = np.abs(case.x.astype(np.float64))
    m, n = case.hm.shape
    absw = np.zeros((m, n))
    for b in case.hm.blocks:
        if b.kind == BlockKind.DENSE:
            absw[b.r0 : b.r1, b.c0 : b.c1] = np.abs(b.dense.astype(np.float64))
        elif b.kind == BlockKind.LOWRANK:
            absw[b.r0 : b.r1, b.c0 : b.c1] = np.abs(b.u.astype(np.float64)) @ np.abs(b.vt.astype(np.float64))
    w = np.empty_like(absw)
    rows = case.hm.row_perm if case.hm.row_perm is not None else np.arange(m)
    cols = case.hm.col_perm if case.hm.col_perm is not None else np.arange(n)
    w[np.ix_(rows, cols)] = absw
    scale = x @ w
    depth = m + max((b.rank for b in case.hm.blocks), default=0)
    acc_eps = depth * np.finfo(np.float32).eps
    out_eps = np.finfo(case.x.dtype).eps if case.x.dtype != np.float64 else 0.0
    return (acc_eps + out_eps) * scale + 1e-30
