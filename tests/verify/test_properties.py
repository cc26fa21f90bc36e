"""Property: verify's layer error on sample s is exactly ||X_s (W - W_H)||_F / ||X_s W||_F; the worst decides."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from dehm_onnx.verify import verify

from ._models import graded_matrix, lowrank_optimized, mlp


@settings(max_examples=10, deadline=None)
@given(
    m=st.integers(8, 40),
    n=st.integers(8, 40),
    tol=st.floats(0.01, 0.6),
    samples=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_measured_error_matches_numpy(m, n, tol, samples, seed):
    rng = np.random.default_rng(seed)
    w = graded_matrix(rng, m, n, 0.8)
    orig = mlp([w], dtype=np.float64)
    opt = lowrank_optimized(orig, {"fc0": tol})
    x = rng.standard_normal((samples, 3, m))
    result = verify(orig, opt, {"x": x})
    inits = {t.name: numpy_helper.to_array(t) for t in opt.graph.initializer}
    w_h = inits["W0.u"] @ inits["W0.vt"]
    per_sample = np.array([np.linalg.norm(xs @ (w - w_h)) / np.linalg.norm(xs @ w) for xs in x])
    (layer,) = result.layers
    np.testing.assert_allclose(layer.sample_errors, per_sample, rtol=1e-9, atol=1e-9)
    assert abs(layer.rel_fro_error - per_sample.max()) <= 1e-9 + 1e-9 * per_sample.max()
    assert layer.median_error == np.median(layer.sample_errors)
    assert layer.ok == (layer.rel_fro_error <= tol + layer.slack)
    rows = x.reshape(-1, m)
    aggregate = np.linalg.norm(rows @ (w - w_h)) / np.linalg.norm(rows @ w)
    (out,) = result.outputs  # a single layer: output = layer
    assert abs(out.rel_l2 - aggregate) <= 1e-9 + 1e-9 * aggregate
    assert abs(out.worst - per_sample.max()) <= 1e-9 + 1e-9 * per_sample.max()
