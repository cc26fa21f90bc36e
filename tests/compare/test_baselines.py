"""The certified baselines: truncated SVD and magnitude pruning meet tol and are minimal."""

from __future__ import annotations

import numpy as np
import pytest

from dehm_onnx.compare.baselines import csr_params, magnitude_prune, truncated_svd
from dehm_onnx.errors import ConfigError, InvalidWeightError


def _graded(rng, m=60, n=40):
    """W with singular values 2^-i: the rank needed for each tol is known."""
    u, _ = np.linalg.qr(rng.standard_normal((m, n)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = 2.0 ** -np.arange(n)
    return (u * s) @ v.T, s


@pytest.mark.parametrize("tol", [1e-1, 1e-2, 1e-4])
def test_truncated_svd_meets_tol_with_the_lowest_rank(rng, tol):
    w, s = _graded(rng)
    factors = truncated_svd(w, tol)
    error = np.linalg.norm(w - factors.u @ factors.vt) / np.linalg.norm(w)
    assert error <= tol and factors.rel_error == pytest.approx(error, rel=1e-6)
    tail_before = np.sqrt(np.sum(s[factors.rank - 1 :] ** 2)) / np.linalg.norm(s)
    assert tail_before > tol  # one rank less would miss the bound (Eckart-Young)
    assert factors.params == factors.rank * (60 + 40)


def test_truncated_svd_float32_factors_hold_the_bound_after_rounding(rng):
    w = rng.standard_normal((64, 64)).astype(np.float32)
    factors = truncated_svd(w, 1e-6)
    assert factors.u.dtype == np.float32
    w64 = w.astype(np.float64)
    error = np.linalg.norm(w64 - factors.u.astype(np.float64) @ factors.vt.astype(np.float64)) / np.linalg.norm(w64)
    assert error <= 1e-6 or factors.rank == 64


def test_magnitude_prune_meets_tol_and_drops_the_most_entries(rng):
    w = rng.standard_normal((50, 30)).astype(np.float32)
    tol = 0.1
    pruned = magnitude_prune(w, tol)
    assert pruned.weight.dtype == w.dtype and pruned.weight.shape == w.shape
    dropped = w[pruned.weight == 0]
    assert np.linalg.norm(dropped) <= tol * np.linalg.norm(w)
    # the smallest kept entry would push the error over tol if dropped too
    smallest_kept = np.min(np.abs(w[pruned.weight != 0]))
    assert np.sqrt(np.sum(dropped.astype(np.float64) ** 2) + smallest_kept**2) > tol * np.linalg.norm(w.astype(np.float64))
    assert np.all(np.abs(dropped) <= smallest_kept)
    assert pruned.params == 2 * pruned.nonzeros + 50 + 1 == csr_params(pruned.weight)


@pytest.mark.parametrize("function", [truncated_svd, magnitude_prune])
def test_baselines_reject_bad_input(function):
    with pytest.raises(ConfigError, match="tol must be in"):
        function(np.ones((4, 4)), 1.0)
    with pytest.raises(InvalidWeightError, match="2-D"):
        function(np.ones(4), 0.1)
    with pytest.raises(InvalidWeightError, match="NaN"):
        function(np.full((4, 4), np.nan), 0.1)
    with pytest.raises(InvalidWeightError, match="floating"):
        function(np.ones((4, 4), dtype=np.int32), 0.1)


def test_truncated_svd_returns_none_beyond_max_rank(rng):
    w, s = _graded(rng)
    needed = truncated_svd(w, 1e-4).rank
    assert truncated_svd(w, 1e-4, max_rank=needed - 1) is None
    assert truncated_svd(w, 1e-4, max_rank=needed).rank == needed
