"""The storage helpers: groupwise quantization, its exact dequantization, bytes and bad values."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dehm_onnx.hmatrix.storage import (
    GROUP_SIZES,
    INT_RANGE,
    Storage,
    StoredArray,
    dequantize_groupwise,
    pack_int4,
    quantize_groupwise,
    store,
    unpack_int4,
)

INTS = (Storage.INT8, Storage.INT4)


def _reference_dequantize(q, scales, group):
    """``fl(q * s)``: the exact product (float64 holds it) rounded once to the scale dtype."""
    s = np.repeat(scales.astype(np.float64), group, axis=0)[: q.shape[0]]
    return (q.astype(np.float64) * s).astype(scales.dtype)


@pytest.mark.parametrize("storage", INTS)
@pytest.mark.parametrize("group", GROUP_SIZES)
@pytest.mark.parametrize("scale_dtype", [np.float16, np.float32, np.float64])
def test_values_on_the_grid_round_trip_exactly(storage, group, scale_dtype):
    rng = np.random.default_rng(group)
    low, high = INT_RANGE[storage]
    rows, cols = 3 * group + 5, 7  # three full groups and a partial one
    q = rng.integers(-high, high + 1, size=(rows, cols))
    q[:: group] = high  # every group reaches the extreme, so amax / high is the scale
    scales = (2.0 ** rng.integers(-6, 6, size=(4, cols))).astype(scale_dtype)
    a = (q * np.repeat(scales.astype(np.float64), group, axis=0)[:rows]).astype(scale_dtype)
    stored = store(a, storage, dtype=scale_dtype, group=group)
    assert stored.values.dtype == np.int8 and stored.scales.dtype == scale_dtype
    assert stored.scales.shape == (4, cols)
    np.testing.assert_array_equal(stored.dequantized(), a)


@pytest.mark.parametrize("storage", INTS)
@pytest.mark.parametrize("scale_dtype", [np.float16, np.float32])
def test_dequantize_is_one_rounding_of_the_exact_product(storage, scale_dtype):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((70, 9)) * 3.0
    stored = store(a, storage, dtype=np.float32, group=32, scale_dtype=scale_dtype)
    expected = _reference_dequantize(stored.values, stored.scales, 32)
    got = dequantize_groupwise(stored.values, stored.scales, 32)
    assert got.dtype == scale_dtype
    np.testing.assert_array_equal(got, expected)


def test_int8_error_is_at_most_half_a_step_and_int4_search_never_loses():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((100, 13))
    s8 = store(a, Storage.INT8, dtype=np.float64, group=16)
    step = np.repeat(s8.scales, 16, axis=0)[:100]
    assert np.all(np.abs(a - s8.dequantized()) <= step / 2 * (1 + 1e-12))
    assert s8.values.min() >= -127 and s8.values.max() <= 127
    s4 = store(a, Storage.INT4, dtype=np.float64, group=16)
    assert s4.values.min() >= -8 and s4.values.max() <= 7
    # The plain scale amax / 7 is one of the candidates, so the search's error per group is no larger.
    plain = np.abs(np.vstack([a, np.zeros((12, 13))])).reshape(7, 16, 13).max(axis=1) / 7
    q = np.clip(np.rint(a / np.repeat(plain, 16, axis=0)[:100]), -8, 7)
    plain_err = ((a - q * np.repeat(plain, 16, axis=0)[:100]) ** 2)
    search_err = (a - s4.dequantized()) ** 2
    pad = lambda e: np.vstack([e, np.zeros((12, 13))]).reshape(7, 16, 13).sum(axis=1)  # noqa: E731
    assert np.all(pad(search_err) <= pad(plain_err) * (1 + 1e-9) + 1e-300)


def test_groups_follow_the_contraction_axis_and_the_last_one_is_partial():
    a = np.ones((40, 3))
    a[32:, 1] = 100.0  # only the partial last group of column 1
    stored = store(a, Storage.INT8, dtype=np.float32, group=32)
    assert stored.scales.shape == (2, 3)
    np.testing.assert_allclose(stored.scales[:, 0], [1 / 127, 1 / 127], rtol=1e-6)
    np.testing.assert_allclose(stored.scales[:, 1], [1 / 127, 100 / 127], rtol=1e-6)
    np.testing.assert_allclose(stored.dequantized(), a, rtol=1e-6)


def test_zero_groups_store_zeros_exactly():
    a = np.zeros((48, 4), dtype=np.float32)
    a[16:32, 2] = np.linspace(-1, 1, 16)
    for storage in INTS:
        stored = store(a, storage, dtype=np.float32, group=16)
        assert np.count_nonzero(stored.scales) == 1
        assert np.all(stored.dequantized()[a == 0] == 0)
        assert np.isfinite(stored.dequantized()).all()


def test_scale_that_underflows_stores_zeros_not_nan():
    a = np.full((16, 2), 1e-12)
    stored = store(a, Storage.INT8, dtype=np.float32, group=16, scale_dtype=np.float16)
    assert np.all(stored.scales == 0)
    np.testing.assert_array_equal(stored.dequantized(), 0)


def test_overflowing_scales_or_float16_values_cannot_be_stored():
    big = np.full((16, 2), 1e6)
    assert store(big, Storage.INT4, dtype=np.float32, group=16, scale_dtype=np.float16) is None
    assert store(big, Storage.FP16, dtype=np.float32) is None
    assert store(big, Storage.INT8, dtype=np.float32, group=16).scales.dtype == np.float32


def test_float_storages_and_their_bytes():
    a = np.random.default_rng(3).standard_normal((33, 5))
    exact = store(a, Storage.FLOAT, dtype=np.float64)
    assert exact.storage == Storage.FLOAT and exact.nbytes == 33 * 5 * 8
    np.testing.assert_array_equal(exact.dequantized(), a)
    half = store(a, Storage.FP16, dtype=np.float32)
    assert half.storage == Storage.FP16 and half.nbytes == 33 * 5 * 2
    # For a float16 weight, float16 is its own dtype.
    assert store(a, Storage.FP16, dtype=np.float16).storage == Storage.FLOAT


def test_integer_bytes_are_payload_plus_scales():
    a = np.random.default_rng(4).standard_normal((33, 5))
    s4 = store(a, Storage.INT4, dtype=np.float32, group=16)
    assert s4.payload_nbytes == (33 * 5 + 1) // 2 and s4.scale_nbytes == 3 * 5 * 4
    assert s4.nbytes == s4.payload_nbytes + s4.scale_nbytes
    s8 = store(a, Storage.INT8, dtype=np.float16, group=64)
    assert s8.payload_nbytes == 33 * 5 and s8.scale_nbytes == 1 * 5 * 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(storage=Storage.INT8, values=np.zeros((4, 2), np.int16), scales=np.ones((1, 2), np.float32), group=16), "int8"),
        (dict(storage=Storage.INT4, values=np.full((4, 2), 9, np.int8), scales=np.ones((1, 2), np.float32), group=16), "outside"),
        (dict(storage=Storage.INT8, values=np.zeros((4, 2), np.int8), scales=np.ones((2, 2), np.float32), group=16), "scales"),
        (dict(storage=Storage.INT8, values=np.zeros((4, 2), np.int8), scales=np.ones((1, 2), np.float32), group=24), "group"),
        (dict(storage=Storage.FP16, values=np.zeros((4, 2), np.float32)), "dtype"),
        (dict(storage=Storage.FLOAT, values=np.zeros((4, 2), np.float32), scales=np.ones((1, 2))), "no scales"),
        (dict(storage=Storage.FLOAT, values=np.zeros(4, np.float32)), "2-D"),
    ],
)
def test_stored_array_rejects_inconsistent_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StoredArray(**kwargs)


def test_quantize_rejects_float_storage():
    with pytest.raises(ValueError, match="not an integer storage"):
        quantize_groupwise(np.ones((2, 2)), Storage.FP16, 16, np.float32)


def test_pack_int4_puts_the_first_value_in_the_low_nibble():
    np.testing.assert_array_equal(pack_int4(np.array([1, -1, 7], dtype=np.int8)), [0xF1, 0x07])
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(np.array([8], dtype=np.int8))
    with pytest.raises(ValueError, match="hold at most"):
        unpack_int4(np.zeros(1, np.uint8), 3)


@settings(max_examples=50, deadline=None)
@given(values=st.lists(st.integers(-8, 7), min_size=0, max_size=41))
def test_pack_int4_round_trip(values):
    q = np.array(values, dtype=np.int8)
    packed = pack_int4(q)
    assert packed.dtype == np.uint8 and packed.size == (q.size + 1) // 2
    np.testing.assert_array_equal(unpack_int4(packed, q.size), q)


@settings(max_examples=80, deadline=None)
@given(
    rows=st.integers(1, 70),
    cols=st.integers(1, 6),
    storage=st.sampled_from(INTS),
    group=st.sampled_from(GROUP_SIZES),
    scale_dtype=st.sampled_from([np.float16, np.float32, np.float64]),
    exponent=st.integers(-8, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_quantized_values_are_what_dequantize_linear_gives(rows, cols, storage, group, scale_dtype, exponent, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((rows, cols)) * 10.0**exponent
    a[rng.random((rows, cols)) < 0.3] = 0.0
    stored = store(a, storage, dtype=np.float32, group=group, scale_dtype=scale_dtype)
    assert stored is not None
    low, high = INT_RANGE[storage]
    assert stored.values.min(initial=0) >= low and stored.values.max(initial=0) <= high
    deq = stored.dequantized()
    np.testing.assert_array_equal(deq, _reference_dequantize(stored.values, stored.scales, group))
    assert np.all(deq[a == 0] == 0)
    # Half a step inside the range, the clipped excess outside it, plus one rounding of the product.
    step = np.repeat(stored.scales.astype(np.float64), group, axis=0)[:rows]
    inside = np.abs(a) <= high * step
    bound = np.where(inside, step / 2, np.abs(a) - high * step) + 2.0**-10 * np.abs(a)
    assert np.all(np.abs(a - deq.astype(np.float64)) <= bound * (1 + 1e-9) + 1e-300)


@pytest.mark.parametrize("value", [1e-45, 1e-40, 1e-38, 3e38])
@pytest.mark.parametrize("storage", INTS)
@pytest.mark.parametrize("scale_dtype", [np.float16, np.float32])
def test_extreme_magnitudes_give_valid_integers_or_no_storage(value, storage, scale_dtype):
    # Regression: a subnormal scale once made 1/scale overflow and the integers NaN.
    a = np.full((16, 3), value, dtype=np.float32)
    a[3, 1] = -value
    stored = store(a, storage, dtype=np.float32, group=16, scale_dtype=scale_dtype)
    if stored is None:
        assert scale_dtype == np.float16 and value > 1e30
        return
    low, high = INT_RANGE[storage]
    assert low <= stored.values.min() and stored.values.max() <= high
    deq = stored.dequantized().astype(np.float64)
    assert np.isfinite(deq).all()
    assert np.all(np.abs(deq - a) <= np.abs(a.astype(np.float64)) + 1e-300)


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0), (17, 0)])
@pytest.mark.parametrize("storage", [Storage.INT8, Storage.INT4])
def test_empty_arrays_quantize_to_empty_integers_and_scales(shape, storage):
    q, scales = quantize_groupwise(np.zeros(shape, np.float32), storage, 16, np.float32)
    assert q.shape == shape and q.dtype == np.int8
    assert scales.shape == (-(-shape[0] // 16), shape[1])
