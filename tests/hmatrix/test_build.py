"""compress(): the certified bound, the oracle comparison and the error messages."""

from __future__ import annotations

import numpy as np
import pytest

from dehm_onnx.errors import ConfigError, InvalidWeightError
from dehm_onnx.hmatrix import BlockKind, compress

from .matrices import log_kernel_1d, suite
from .oracle import dense_format_bytes, oracle_bytes, oracle_params

SUITE = suite(np.random.default_rng(1))


def _true_error(w: np.ndarray, hm) -> float:
    return float(np.linalg.norm(w.astype(np.float64) - hm.to_dense()))


@pytest.mark.parametrize("tol", [1e-2, 1e-4])
@pytest.mark.parametrize("name", sorted(SUITE))
def test_compress_never_worse_than_simple_choices(name, tol):
    w = SUITE[name]
    hm = compress(w, tol)
    assert all(b.is_float for b in hm.blocks)
    oracle = oracle_params(w, tol)
    assert hm.params <= min(oracle.values()), (name, hm.params, oracle)
    in_bytes = oracle_bytes(w, tol, hm.block_overhead, quantized=False)
    assert hm.nbytes <= min(in_bytes.values()), (name, hm.nbytes, in_bytes)
    assert _true_error(w, hm) <= hm.certified_error <= tol * hm.norm


QUANTIZED_CASES = [(name, tol) for name in sorted(SUITE) for tol in (1e-2, 1e-4)] + [
    (name, 0.1) for name in ("exp1d_shuffled_256", "gaussian_256", "log1d_384", "lowrank_noise_200x300", "mel_257x80")
]


@pytest.mark.parametrize(("name", "tol"), QUANTIZED_CASES)
def test_compress_never_more_bytes_than_simple_choices(name, tol):
    w = SUITE[name].astype(np.float32)
    hm = compress(w, tol, precision="auto")
    oracle = oracle_bytes(w, tol, hm.block_overhead, quantized=True)
    assert hm.nbytes <= min(oracle.values()), (name, hm.nbytes, sorted(oracle.items(), key=lambda kv: kv[1])[:3])
    assert _true_error(w, hm) <= hm.certified_error <= tol * hm.norm


@pytest.mark.parametrize("tol", [0.1, 0.05, 0.02, 1e-2])
def test_compress_gaussian_no_more_bytes_than_best_uniform_format(tol):
    w = SUITE["gaussian_256"].astype(np.float32)
    hm = compress(w, tol, precision="auto")
    uniform = dense_format_bytes(w, tol, hm.block_overhead, np.float32)
    assert hm.nbytes <= min(uniform.values())
    assert hm.nbytes < w.nbytes / 3  # int8 meets every tol here
    assert _true_error(w, hm) <= hm.certified_error <= tol * hm.norm


@pytest.mark.parametrize("tol", [0.05, 1e-2, 5e-3])
def test_compress_structure_pays_for_its_blocks_or_one_dense_block_is_kept(tol):
    # A weight without structure: many blocks in mixed storages may save a fraction of a
    # percent over one block in one storage, not enough to be worth more kernels.
    w = (np.random.default_rng(3).standard_normal((512, 512)) / 16).astype(np.float32)
    hm = compress(w, tol, precision="auto")
    uniform = min(dense_format_bytes(w, tol, hm.block_overhead, np.float32).values())
    if len(hm.blocks) > 1:
        assert hm.nbytes <= 0.98 * uniform
    else:
        assert hm.nbytes == uniform
    assert _true_error(w, hm) <= hm.certified_error <= tol * hm.norm


@pytest.mark.slow
def test_compress_gaussian_4096_is_one_int8_block_not_hundreds_of_mixed_ones():
    # Regression: 211 dense blocks of mixed int4/int8 saved 0.2 % against one int8 block.
    w = (np.random.default_rng(0).standard_normal((4096, 4096)) / 64).astype(np.float32)
    hm = compress(w, 1e-2, precision="auto")
    assert hm.counts() == {"zero": 0, "dense": 1, "lowrank": 0}
    assert hm.blocks[0].storage[0].storage.name == "INT8"
    assert hm.nbytes < 0.26 * w.nbytes
    assert hm.certified_error <= 1e-2 * hm.norm


@pytest.mark.parametrize("tol", [1e-2, 1e-4])
def test_compress_kernel_matrices_beat_every_fixed_structure(tol):
    for name in ("log1d_384", "exp1d_320", "invdist2d_300"):
        hm = compress(SUITE[name], tol)
        assert hm.params < min(oracle_params(SUITE[name], tol).values()), name


def test_compress_gaussian_random_stays_dense():
    hm = compress(SUITE["gaussian_256"], 1e-2)
    assert hm.counts() == {"zero": 0, "dense": 1, "lowrank": 0}
    assert hm.certified_error == 0.0 and hm.is_unchanged
    assert hm.nbytes == hm.dense_nbytes
    np.testing.assert_array_equal(hm.to_dense(), SUITE["gaussian_256"])


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4", "auto"])
def test_compress_precision_restricts_the_storages(precision):
    allowed = {"fp16": {"float", "fp16"}, "int8": {"float", "fp16", "int8"}, "int4": {"float", "fp16", "int8", "int4"}}
    allowed["auto"] = allowed["int4"]
    w = SUITE["exp1d_320"].astype(np.float32)
    hm = compress(w, 1e-3, precision=precision)
    used = {a.storage.label for b in hm.blocks for a in b.storage}
    assert used <= allowed[precision] and used - {"float"}
    assert hm.nbytes < compress(w, 1e-3).nbytes
    assert _true_error(w, hm) <= hm.certified_error <= 1e-3 * hm.norm


def test_compress_quantized_blocks_report_their_bytes():
    w = SUITE["log1d_384"].astype(np.float32)
    hm = compress(w, 1e-3, precision="auto")
    assert hm.nbytes == hm.payload_nbytes + hm.scale_nbytes + hm.layout_nbytes + hm.index_nbytes
    assert hm.layout_nbytes == hm.block_overhead * sum(b.layout_rows for b in hm.blocks)
    assert hm.scale_nbytes > 0 and hm.byte_ratio == hm.nbytes / (384 * 384 * 4)
    assert sum(hm.precision_counts().values()) == sum(1 for b in hm.blocks if b.kind != BlockKind.ZERO)
    for b in hm.blocks:
        for a in b.storage:
            if a.scales is not None:
                assert a.scales.dtype == np.float32 and a.scales.shape[0] == -(-a.shape[0] // a.group)


@pytest.mark.parametrize(("dtype", "precision"), [(np.float64, "int4"), (np.float16, "int8"), (np.float16, "int4")])
def test_compress_any_float_dtype_with_integers(dtype, precision):
    w = SUITE["exp1d_320"].astype(dtype)
    hm = compress(w, 1e-2, precision=precision)
    assert any(a.storage.is_int for b in hm.blocks for a in b.storage)
    assert all(a.scales.dtype == dtype for b in hm.blocks for a in b.storage if a.scales is not None)
    assert _true_error(w, hm) <= hm.certified_error <= 1e-2 * hm.norm
    assert hm.nbytes <= hm.dense_nbytes


def test_compress_scales_that_would_overflow_keep_dense_blocks_float():
    # Float16 scales cannot hold amax / 7 of entries near 1e6, nor float16 the entries: dense
    # blocks stay float (balanced low-rank factors, of magnitude ~sqrt(sigma), still fit).
    w = (SUITE["gaussian_256"] * 1e6).astype(np.float32)
    hm = compress(w, 0.1, precision="int4", scale_dtype=np.float16)
    assert all(b.is_float for b in hm.blocks if b.kind == BlockKind.DENSE)
    assert all(np.isfinite(a.scales).all() for b in hm.blocks for a in b.storage if a.scales is not None)
    assert _true_error(w, hm) <= hm.certified_error <= 0.1 * hm.norm
    # With float32 scales the same weight is stored dense in integers.
    quantized = compress(w, 0.1, precision="int4")
    assert any(a.storage.is_int for b in quantized.blocks if b.kind == BlockKind.DENSE for a in b.storage)


@pytest.mark.parametrize("scale", [1e-30, 1e-9, 1e6, 1e30])
def test_compress_extreme_magnitudes_stay_within_the_bound(scale):
    w = (SUITE["exp1d_320"] * scale).astype(np.float32)
    for scale_dtype in (np.float16, np.float32):
        hm = compress(w, 1e-2, precision="int4", scale_dtype=scale_dtype)
        assert np.isfinite(hm.to_dense()).all()
        assert _true_error(w, hm) <= hm.certified_error <= 1e-2 * hm.norm


def test_compress_mel_filterbank_adapts_its_leaves():
    w = SUITE["mel_257x80"].astype(np.float32)
    hm = compress(w, 1e-3, precision="auto")
    shapes = {b.shape for b in hm.blocks if b.kind != BlockKind.ZERO}
    assert min(r * c for r, c in shapes) < 32 * 10  # below the 32-row uniform leaves
    assert hm.byte_ratio < 0.2
    assert _true_error(w, hm) <= hm.certified_error <= 1e-3 * hm.norm


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


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(leaf_size=0), "leaf_size"),
        (dict(min_leaf=0), "min_leaf"),
        (dict(permute="yes"), "permute"),
        (dict(precision="int2"), "precision must be one of"),
        (dict(precision="int8", group=24), "group must be"),
        (dict(precision="int8", group=True), "group must be"),
        (dict(scale_dtype=np.int32), "scale_dtype"),
        (dict(scale_dtype="nonsense"), "scale_dtype"),
        (dict(block_overhead=-1), "block_overhead"),
        (dict(block_overhead=2.5), "block_overhead"),
    ],
)
def test_compress_rejects_bad_options(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        compress(np.ones((4, 4)), 0.1, **kwargs)


def test_compress_float_large_dense_leaf():
    # Regression: a dense leaf above the exact-measurement area once needed the quantized
    # error table, which float-only compression does not build.
    w = np.random.default_rng(7).standard_normal((300, 400)).astype(np.float32)
    hm = compress(w, 0.01)
    assert hm.is_unchanged and hm.nbytes == hm.dense_nbytes
