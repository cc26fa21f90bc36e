"""compress(): the certified bound, the oracle comparison and the error messages."""

from __future__ import annotations

import numpy as np
import pytest

from dehm_onnx.errors import ConfigError, InvalidWeightError
from dehm_onnx.hmatrix import BlockKind, compress

from .matrices import log_kernel_1d, suite
from .oracle import oracle_params

SUITE = suite(np.random.default_rng(1))


def _true_error(w: np.ndarray, hm) -> float:
    return float(np.linalg.norm(w.astype(np.float64) - hm.to_dense()))


@pytest.mark.parametrize("tol", [1e-2, 1e-4])
@pytest.mark.parametrize("name", sorted(SUITE))
def test_compress_never_worse_than_simple_choices(name, tol):
    w = SUITE[name]
    hm = compress(w, tol)
    oracle = oracle_params(w, tol)
    assert hm.params <= min(oracle.values()), (name, hm.params, oracle)
    assert _true_error(w, hm) <= hm.certified_error <= tol * hm.norm


@pytest.mark.parametrize("tol", [1e-2, 1e-4])
def test_compress_kernel_matrices_beat_every_fixed_structure(tol):
    for name in ("log1d_384", "exp1d_320", "invdist2d_300"):
        hm = compress(SUITE[name], tol)
        assert hm.params < min(oracle_params(SUITE[name], tol).values()), name


def test_compress_gaussian_random_stays_dense():
    hm = compress(SUITE["gaussian_256"], 1e-2)
    assert hm.counts() == {"zero": 0, "dense": 1, "lowrank": 0}
    assert hm.certified_error == 0.0
    np.testing.assert_array_equal(hm.to_dense(), SUITE["gaussian_256"])


def test_compress_mel_filterbank_finds_exact_zero_blocks():
    hm = compress(SUITE["mel_257x80"], 1e-4)
    assert hm.counts()["zero"] > 0
    assert hm.ratio < 0.2


def test_compress_exact_low_rank_gets_its_rank():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((150, 5)) @ rng.standard_normal((5, 90))
    hm = compress(w, 1e-6)
    assert hm.params <= 5 * (150 + 90)
    assert hm.max_rank <= 5


def test_compress_permutes_shuffled_kernel():
    hm = compress(SUITE["exp1d_shuffled_256"], 1e-2)
    assert hm.row_perm is not None and hm.col_perm is not None
    assert hm.ratio < 0.3
    natural = compress(SUITE["exp1d_shuffled_256"], 1e-2, permute=False)
    assert natural.ratio > 0.9


def test_compress_all_zero_is_one_zero_block():
    hm = compress(np.zeros((100, 70), np.float32), 1e-3)
    assert [b.kind for b in hm.blocks] == [BlockKind.ZERO]
    assert hm.params == 0 and hm.certified_error == 0.0


def test_compress_large_matrix_uses_randomized_blocks_and_keeps_bound():
    w = log_kernel_1d(1100, np.random.default_rng(5)).astype(np.float32)
    hm = compress(w, 1e-4, permute=False)
    assert hm.ratio < 0.2
    assert _true_error(w, hm) <= hm.certified_error <= 1e-4 * hm.norm


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_compress_stores_weight_dtype(dtype):
    w = SUITE["exp1d_320"].astype(dtype)
    hm = compress(w, 1e-2)
    assert hm.dtype == dtype
    for block in hm.blocks:
        for arr in (block.dense, block.u, block.vt):
            assert arr is None or arr.dtype == dtype
    assert _true_error(w, hm) <= hm.certified_error <= 1e-2 * hm.norm


def test_compress_float16_at_tight_tol_falls_back_within_bound():
    w = SUITE["log1d_384"].astype(np.float16)
    hm = compress(w, 1e-5)
    assert _true_error(w, hm) <= hm.certified_error <= 1e-5 * hm.norm


def test_compress_is_deterministic_for_a_seed():
    w = SUITE["exp1d_shuffled_256"]
    a, b = compress(w, 1e-3, seed=7), compress(w, 1e-3, seed=7)
    np.testing.assert_array_equal(a.to_dense(), b.to_dense())
    assert a.certified_error == b.certified_error


@pytest.mark.parametrize(
    ("w", "tol", "error", "match"),
    [
        (np.array([[np.nan, 1.0]]), 0.1, InvalidWeightError, "NaN/Inf"),
        (np.array([[np.inf, 1.0]]), 0.1, InvalidWeightError, "NaN/Inf"),
        (np.ones(5), 0.1, InvalidWeightError, "2-D"),
        (np.ones((2, 2, 2)), 0.1, InvalidWeightError, "2-D"),
        (np.ones((3, 3), dtype=np.int32), 0.1, InvalidWeightError, "int32"),
        (np.zeros((0, 3)), 0.1, InvalidWeightError, "empty"),
        (np.ones((3, 3)), 0.0, ConfigError, "tol must be in"),
        (np.ones((3, 3)), 1.0, ConfigError, "tol must be in"),
        (np.ones((3, 3)), float("nan"), ConfigError, "tol must be in"),
        (np.ones((3, 3)), "0.1", ConfigError, "tol must be in"),
    ],
)
def test_compress_rejects_bad_input(w, tol, error, match):
    with pytest.raises(error, match=match):
        compress(w, tol)
    assert issubclass(error, ValueError)


def test_compress_rejects_bad_options():
    with pytest.raises(ConfigError, match="leaf_size"):
        compress(np.ones((4, 4)), 0.1, leaf_size=0)
    with pytest.raises(ConfigError, match="permute"):
        compress(np.ones((4, 4)), 0.1, permute="yes")
