"""The packed layout: round trip, product and validation messages."""

from __future__ import annotations

import numpy as np
import pytest

from dehm_onnx.hmatrix import compress, pack, unpack, validate_packed
from dehm_onnx.hmatrix.pack import ALIGN, BYTE_OFFSET, KIND, LAYOUT_V2_COLUMNS, OFFSET, RANK, ROW1, SHAPE_KIND

from .matrices import exp_kernel_1d


@pytest.fixture
def packed():
    w = exp_kernel_1d(200, cols=130, scale=0.05).astype(np.float32)
    return w, compress(w, 1e-3, permute=True), pack(compress(w, 1e-3, permute=True))


def test_pack_round_trip_is_exact(packed):
    _, hm, p = packed
    np.testing.assert_array_equal(unpack(p).to_dense(), hm.to_dense())
    assert p.data.dtype == np.float32 and p.layout.dtype == np.int64
    assert p.data.size == hm.params
    assert validate_packed(p.data, p.layout, p.row_perm, p.col_perm) == (200, 130)


def test_pack_identity_permutation_is_empty():
    p = pack(compress(exp_kernel_1d(64), 1e-3, permute=False))
    assert p.row_perm.size == 0 and p.col_perm.size == 0


def test_matmul_supports_batched_and_3d_inputs(packed):
    w, hm, _ = packed
    x = np.random.default_rng(0).standard_normal((2, 3, 200)).astype(np.float32)
    y = hm.matmul(x)
    assert y.shape == (2, 3, 130) and y.dtype == np.float32
    np.testing.assert_allclose(y, x @ hm.to_dense(), rtol=1e-4, atol=1e-4)
    assert hm.matmul(np.zeros((0, 200))).shape == (0, 130)


def _broken(p, fix):
    layout, data, rp, cp = p.layout.copy(), p.data.copy(), p.row_perm.copy(), p.col_perm.copy()
    layout, data, rp, cp = fix(layout, data, rp, cp)
    return data, layout, rp, cp


@pytest.mark.parametrize(
    ("fix", "match"),
    [
        (lambda l, d, r, c: (l[:, :6], d, r, c), "layout must have shape"),
        (lambda l, d, r, c: (l, d[:-1], r, c), "outside data"),
        (lambda l, d, r, c: (_set(l, 0, KIND, 7), d, r, c), "unknown kind"),
        (lambda l, d, r, c: (_set(l, 0, OFFSET, -1), d, r, c), "outside data"),
        (lambda l, d, r, c: (l, d, r[:-1], c), "row_perm"),
        (lambda l, d, r, c: (l, d, np.zeros_like(r), c), "not a permutation"),
        (lambda l, d, r, c: (l[1:], d, r, c), "cover"),
        (lambda l, d, r, c: (_set(_set(l, 0, KIND, 0), 0, ROW1, 10**6), d, r, c), "cover"),
        (lambda l, d, r, c: (_set(l, _lowrank_row(l), RANK, -1), d, r, c), "negative rank"),
    ],
)
def test_validate_packed_names_the_problem(packed, fix, match):
    with pytest.raises(ValueError, match=match):
        validate_packed(*_broken(packed[2], fix))


def _set(layout, row, col, value):
    layout[row, col] = value
    return layout


def _lowrank_row(layout):
    return int(np.flatnonzero(layout[:, KIND] == 2)[0])


def test_pack_v1_keeps_the_dequantized_values_of_quantized_blocks():
    w = exp_kernel_1d(200, cols=130, scale=0.05).astype(np.float32)
    hm = compress(w, 1e-2, precision="auto")
    assert any(a.storage.is_int for b in hm.blocks for a in b.storage)
    p = pack(hm)
    assert p.data.dtype == np.float32
    np.testing.assert_array_equal(unpack(p).to_dense(), hm.to_dense())
    assert np.linalg.norm(w.astype(np.float64) - unpack(p).to_dense()) <= hm.certified_error


def test_pack_v1_refuses_values_its_dtype_cannot_hold():
    w = exp_kernel_1d(200, cols=130, scale=0.05).astype(np.float16)
    hm = compress(w, 1e-2, precision="int8", scale_dtype=np.float32)
    assert any(a.scales is not None and a.scales.dtype == np.float32 for b in hm.blocks for a in b.storage)
    with pytest.raises(ValueError, match="not all representable"):
        pack(hm)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_pack_v2_keeps_every_stored_array_exactly(dtype):
    w = exp_kernel_1d(200, cols=130, scale=0.05).astype(dtype)
    hm = compress(w, 1e-2, precision="auto")
    assert any(a.storage.is_int for b in hm.blocks for a in b.storage)
    p = pack(hm, version=2)
    assert p.version == 2 and p.data.dtype == np.uint8 and p.layout.shape[1] == len(LAYOUT_V2_COLUMNS)
    back = unpack(p)
    assert back.dtype == hm.dtype and back.precision_counts() == hm.precision_counts()
    stored = [b for b in hm.blocks if b.kind != 0]  # version 2 has no rows for zero blocks
    assert len(back.blocks) == len(stored) and back.counts()["zero"] == 0 < hm.counts()["zero"]
    for original, restored in zip(stored, back.blocks):
        assert [a.storage for a in original.storage] == [a.storage for a in restored.storage]
        for a, b in zip(original.storage, restored.storage):
            np.testing.assert_array_equal(a.values, b.values)
            if a.scales is not None:
                np.testing.assert_array_equal(a.scales, b.scales)
    np.testing.assert_array_equal(back.to_dense(), hm.to_dense())
    # Payload and scales, plus at most ALIGN - 1 bytes of padding before each array and table.
    tables = sum(2 if a.scales is not None else 1 for b in hm.blocks for a in b.storage)
    assert hm.payload_nbytes + hm.scale_nbytes <= p.data.size <= hm.payload_nbytes + hm.scale_nbytes + (ALIGN - 1) * tables
    assert (p.layout[:, BYTE_OFFSET] % ALIGN == 0).all()
    assert p.layout[0].tolist() == [SHAPE_KIND, 0, 200, 0, 130, 0, 0, 0]
    # One 64-byte row per dense block and per tier, plus the shape row: the engine's byte count.
    assert p.layout.nbytes == 64 * (1 + sum(b.layout_rows for b in hm.blocks))


def test_pack_v2_writes_tiers_as_consecutive_rows():
    w = exp_kernel_1d(200, cols=130, scale=0.05).astype(np.float32)
    hm = compress(w, 1e-3, precision="auto")
    p = pack(hm, version=2)
    assert p.layout.shape[0] == 1 + sum(b.layout_rows for b in hm.blocks)
    assert (p.layout[:, RANK] >= 0).all()


def test_pack_refuses_what_v2_cannot_hold():
    w = exp_kernel_1d(64, scale=0.05)  # float64
    hm = compress(w, 1e-2, precision="int8")
    with pytest.raises(ValueError, match="float32 and float16 only"):
        pack(hm, version=2)
    with pytest.raises(ValueError, match="layout version must be one of"):
        pack(hm, version=3)
