"""The one conformance table for HMatMul: hand-built H-matrices and inputs.

Every case is built from ``dehm_onnx.hmatrix`` types and ``pack`` (never from ``compress``),
so it does not depend on the compression algorithm's choices. The expected result is
``X @ hm.to_dense()`` in float64; every implementation (numpy reference, onnx.reference
OpRun, CPU kernel, emit modes, CUDA kernel) runs the same table.

``CASES_V2`` holds H-matrices whose arrays are stored in float16, int8 or int4 (built with
``storage.store``), for packed layout version 2; their expected result is the product with the
dequantized values, which every layout and kernel must reproduce to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dehm_onnx.hmatrix import Block, BlockKind, HMatrix, Storage, StoredArray, store

__all__ = ["Case", "CASES", "CASES_V2", "FLOAT_CASES", "expected", "tolerance"]


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


def _random_stored(rng, shape, storage: Storage, dtype, group: int = 16):
    """A random array kept in ``storage`` (values as the engine would store them)."""
    return store(rng.standard_normal(shape), storage, dtype=dtype, group=group)


def _tiered(rng, r0, r1, c0, c1, tiers, dtype):
    """A low-rank block whose tiers are ``[(rank, U storage, U group, Vt storage, Vt group), ...]``."""
    arrays = []
    for k, su, gu, sv, gv in tiers:
        arrays += [_random_stored(rng, (r1 - r0, k), su, dtype, gu), _random_stored(rng, (k, c1 - c0), sv, dtype, gv)]
    return Block(BlockKind.LOWRANK, r0, r1, c0, c1, storage=tuple(arrays))


def _quantized_dense(rng, r0, r1, c0, c1, storage, dtype, group=16):
    return Block(BlockKind.DENSE, r0, r1, c0, c1, storage=(_random_stored(rng, (r1 - r0, c1 - c0), storage, dtype, group),))


def _quantized_cases() -> list[Case]:
    """Blocks in every storage: float16, int8 and int4 with groups of 16..128 rows (partial
    last groups, ranks above a group), tiers of mixed storage, uniform and uneven tilings."""
    f32, f16 = np.float32, np.float16
    F, H, I8, I4 = Storage.FLOAT, Storage.FP16, Storage.INT8, Storage.INT4
    cases = []
    rng = _rng(21)
    blocks = [
        _quantized_dense(rng, 0, 37, 0, 20, I8, f32, 16),
        _tiered(rng, 0, 37, 20, 48, [(1, F, 0, F, 0), (3, H, 0, I8, 16), (20, I4, 16, I4, 16)], f32),
        _tiered(rng, 37, 64, 0, 20, [(2, I8, 32, H, 0), (2, I4, 64, I8, 128)], f32),
        _quantized_dense(rng, 37, 64, 20, 48, I4, f32, 32),
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
        blocks.append(_quantized_dense(rng, 16 * i, 16 * i + 16, 16 * i, 16 * i + 16, storages[i % 3], f32, 16))
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
        _quantized_dense(rng, 0, 51, 0, 20, I8, f32, 32),
        _quantized_dense(rng, 51, 101, 20, 40, I8, f32, 32),
        _quantized_dense(rng, 101, 152, 40, 60, I4, f32, 16),
        _quantized_dense(rng, 152, 201, 60, 80, I4, f32, 16),
    ]
    hm = _hm((201, 80), blocks, f32)
    cases.append(Case("quantized_uneven", hm, rng.standard_normal((4, 201)).astype(f32)))
    # A float16 weight: float16 scales.
    rng = _rng(24)
    blocks = [
        _quantized_dense(rng, 0, 32, 0, 32, I8, f16, 16),
        _tiered(rng, 0, 32, 32, 64, [(2, F, 0, I4, 16), (2, I4, 16, F, 0)], f16),
        _tiered(rng, 32, 64, 0, 32, [(3, I8, 32, I8, 16)], f16),
        _quantized_dense(rng, 32, 64, 32, 64, I4, f16, 32),
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


def _stored(rng, shape, storage, dtype, group=0, scale_dtype=None):
    """A random array kept as ``storage`` (``store`` never fails on these Gaussian values)."""
    if 0 in shape and storage.is_int:  # an empty integer array, built directly
        scales = np.zeros((-(-shape[0] // group), shape[1]), scale_dtype or dtype)
        return StoredArray(storage, np.zeros(shape, np.int8), scales, group)
    a = rng.standard_normal(shape)
    return store(a, storage, dtype=dtype, group=group, scale_dtype=scale_dtype)


def _qdense(rng, r0, r1, c0, c1, storage, dtype, group=0, scale_dtype=None):
    return Block(BlockKind.DENSE, r0, r1, c0, c1, storage=(_stored(rng, (r1 - r0, c1 - c0), storage, dtype, group, scale_dtype),))


def _qlowrank(rng, r0, r1, c0, c1, tiers, dtype, scale_dtype=None):
    """A low-rank block with one ``(U_t, Vt_t)`` pair per ``(rank, storage, group)`` in ``tiers``."""
    arrays = []
    for k, storage, group in tiers:
        arrays.append(_stored(rng, (r1 - r0, k), storage, dtype, group, scale_dtype))
        arrays.append(_stored(rng, (k, c1 - c0), storage, dtype, group, scale_dtype))
    return Block(BlockKind.LOWRANK, r0, r1, c0, c1, storage=tuple(arrays))


def _build_cases_v2() -> list[Case]:
    f32, f16 = np.float32, np.float16
    fp16, i8, i4 = Storage.FP16, Storage.INT8, Storage.INT4
    cases = []
    rng = _rng(21)
    cases.append(Case("q_fp16_dense", _hm((9, 7), [_qdense(rng, 0, 9, 0, 7, fp16, f32)], f32),
                      rng.standard_normal((2, 9)).astype(f32)))
    rng = _rng(22)
    # 37 rows in groups of 16: the last group is partial.
    cases.append(Case("q_int8_dense_partial_group", _hm((37, 5), [_qdense(rng, 0, 37, 0, 5, i8, f32, 16)], f32),
                      rng.standard_normal((3, 37)).astype(f32)))
    rng = _rng(23)
    # 45 x 7 = 315 int4 values: an odd count, the last byte half used.
    cases.append(Case("q_int4_dense_odd", _hm((45, 7), [_qdense(rng, 0, 45, 0, 7, i4, f32, 32)], f32),
                      rng.standard_normal((1, 45)).astype(f32)))
    rng = _rng(24)
    tiers = ((2, fp16, 0), (3, i8, 16), (1, i4, 16), (2, Storage.FLOAT, 0))
    mixed = [
        _qlowrank(rng, 0, 21, 0, 13, tiers, f32),
        _qdense(rng, 21, 40, 0, 13, i4, f32, 16),
        _qlowrank(rng, 0, 40, 13, 30, ((3, i4, 32), (0, i8, 16)), f32),
    ]
    hm = _hm((40, 30), mixed, f32, rng.permutation(40), rng.permutation(30))
    cases.append(Case("q_mixed_tiers_permuted", hm, rng.standard_normal((2, 3, 40)).astype(f32)))
    cases.append(Case("q_mixed_tiers_batch0", hm, np.zeros((0, 40), f32)))
    cases.append(Case("q_mixed_tiers_1d", hm, rng.standard_normal(40).astype(f32)))
    cases.append(Case("q_mixed_tiers_batch150", hm, rng.standard_normal((150, 40)).astype(f32)))
    rng = _rng(25)
    # float32 weight, float16 scales: each dequantized value is rounded once to float16.
    half_scales = [_qdense(rng, 0, 33, 0, 19, i8, f32, 16, f16), _qlowrank(rng, 33, 50, 0, 19, ((4, i4, 16),), f32, f16)]
    cases.append(Case("q_float16_scales", _hm((50, 19), half_scales, f32), rng.standard_normal((4, 50)).astype(f32)))
    rng = _rng(26)
    # float16 weight (float16 scales by default) and float16 activations.
    f16_blocks = [_qdense(rng, 0, 30, 0, 20, i8, f16, 16), Block(BlockKind.ZERO, 30, 47, 0, 20),
                  _qlowrank(rng, 0, 47, 20, 41, ((2, Storage.FLOAT, 0), (5, i4, 16)), f16)]
    hm16 = _hm((47, 41), f16_blocks, f16, rng.permutation(47), None)
    cases.append(Case("q_float16_weight", hm16, rng.standard_normal((6, 47)).astype(f16)))
    # float32 weight with float16 activations.
    cases.append(Case("q_mixed_tiers_float16_x", hm, rng.standard_normal((5, 40)).astype(f16)))
    # Enough multiply-adds (batch x stored values >= 2^19) for the multi-task path, odd sizes.
    for batch, name in ((1, "q_large_1d"), (9, "q_large_parallel"), (70, "q_large_parallel_batch70")):
        rng = _rng(27)
        blocks = [_qdense(rng, 0, 530, 0, 301, i4, f32, 64), _qdense(rng, 530, 601, 0, 301, i8, f32, 128),
                  _qlowrank(rng, 0, 601, 301, 333, ((5, fp16, 0), (9, i8, 32)), f32)]
        hm_large = _hm((601, 333), blocks, f32, rng.permutation(601), rng.permutation(333))
        cases.append(Case(name, hm_large, rng.standard_normal((batch, 601)).astype(f32)))
    return cases


CASES_V2 = _build_cases_v2()

def expected(case: Case) -> np.ndarray:
    """``X @ W_H`` in float64 from the dense reconstruction."""
    return case.x.astype(np.float64) @ case.hm.to_dense()


def tolerance(case: Case) -> np.ndarray:
    """Elementwise bound: float accumulation error plus one rounding to the output dtype
    (relative, plus half the subnormal spacing for results that round to a subnormal).

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
    # Rounding to a subnormal output errs by up to half its spacing, whatever the value's size.
    out_tiny = float(np.finfo(case.x.dtype).smallest_subnormal) / 2 if case.x.dtype != np.float64 else 0.0
    return (acc_eps + out_eps) * scale + out_tiny + 1e-30
