"""Layout v2 over random storages: the CPU kernel equals the product with the dequantized values.

Each example draws a random block tiling (a two-way split of random depth), and for every
stored array a random storage (float, float16, int8, int4), group size and scale dtype, then
runs the packed H-matrix through the CPU kernel and compares with ``X @ hm.to_dense()`` within
the float-rounding bound of the conformance table. It also checks that ``unpack`` returns the
stored arrays exactly.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hmatmul_cases import Case, tolerance
from test_hmatmul_cases import assert_matches

from dehm_onnx.hmatrix import GROUP_SIZES, Block, BlockKind, HMatrix, Storage, pack, store, unpack
from dehm_onnx.ops.hmatmul import make_hmatmul_model
from dehm_onnx.ops.library import make_session

STORAGES = (Storage.FLOAT, Storage.FP16, Storage.INT8, Storage.INT4)


@st.composite
def stored_arrays(draw, shape, dtype, magnitudes):
    storage = draw(st.sampled_from(STORAGES))
    group = draw(st.sampled_from(GROUP_SIZES)) if storage.is_int else 0
    scale_dtype = draw(st.sampled_from((dtype, np.float16))) if storage.is_int else None
    seed = draw(st.integers(0, 2**32 - 1))
    values = np.random.default_rng(seed).standard_normal(shape) * draw(st.sampled_from(magnitudes))
    return store(values, storage, dtype=dtype, group=group, scale_dtype=scale_dtype)


@st.composite
def blocks(draw, r0, r1, c0, c1, depth, dtype, magnitudes):
    rows, cols = r1 - r0, c1 - c0
    if depth > 0 and rows >= 2 and cols >= 2 and draw(st.booleans()):
        rm, cm = draw(st.integers(r0 + 1, r1 - 1)), draw(st.integers(c0 + 1, c1 - 1))
        out = []
        for a, b, c, d in ((r0, rm, c0, cm), (r0, rm, cm, c1), (rm, r1, c0, cm), (rm, r1, cm, c1)):
            out += draw(blocks(a, b, c, d, depth - 1, dtype, magnitudes))
        return out
    kind = draw(st.sampled_from((BlockKind.ZERO, BlockKind.DENSE, BlockKind.LOWRANK)))
    if kind == BlockKind.ZERO:
        return [Block(kind, r0, r1, c0, c1)]
    if kind == BlockKind.DENSE:
        return [Block(kind, r0, r1, c0, c1, storage=(draw(stored_arrays((rows, cols), dtype, magnitudes)),))]
    arrays = []
    for k in draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)):
        arrays += [draw(stored_arrays((rows, k), dtype, magnitudes)), draw(stored_arrays((k, cols), dtype, magnitudes))]
    return [Block(kind, r0, r1, c0, c1, storage=tuple(arrays))]


@st.composite
def cases(draw):
    dtype = np.dtype(draw(st.sampled_from((np.float32, np.float16))))
    x_dtype = draw(st.sampled_from((np.float32, np.float16)))
    # float16 outputs must stay below 65504: smaller weights for float16 activations.
    magnitudes = (1e-3, 1.0, 30.0) if x_dtype == np.float32 else (1e-3, 1.0)
    m, n = draw(st.integers(1, 90)), draw(st.integers(1, 70))
    leaves = draw(blocks(0, m, 0, n, draw(st.integers(0, 3)), dtype, magnitudes))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    row_perm = rng.permutation(m) if draw(st.booleans()) else None
    col_perm = rng.permutation(n) if draw(st.booleans()) else None
    hm = HMatrix((m, n), dtype, tuple(leaves), 1.0, 0.0, 0.1, row_perm, col_perm)
    batch = draw(st.sampled_from((0, 1, 2, 17, 100)))
    return Case("random", hm, rng.standard_normal((batch, m)).astype(x_dtype))


@settings(max_examples=60, deadline=None)
@given(cases())
def test_layout_v2_cpu_kernel_matches_dequantized_product(case):
    packed = pack(case.hm, version=2)
    back = unpack(packed)
    stored = [b for b in case.hm.blocks if b.kind != BlockKind.ZERO]  # v2 lists no zero blocks
    assert len(stored) == len(back.blocks)
    for original, restored in zip(stored, back.blocks):
        for a, b in zip(original.storage, restored.storage):
            np.testing.assert_array_equal(a.dequantized(), b.dequantized())
            assert a.values.dtype == b.values.dtype and a.group == b.group
            assert a.storage == b.storage or {a.storage, b.storage} == {Storage.FLOAT, Storage.FP16}
    model = make_hmatmul_model(packed, x_rank=2, dtype=case.x.dtype)
    assert_matches(case, make_session(model).run(None, {"X": case.x})[0])
    assert tolerance(case).shape == (case.x.shape[0], case.hm.shape[1])
