"""``--emit custom`` writes layout v2 for quantized H-matrices and keeps their bytes in the file."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hmatmul_cases import CASES_V2
from test_hmatmul_cases import assert_matches

from dehm_onnx.graph.emit import layer_model
from dehm_onnx.hmatrix import compress, pack
from dehm_onnx.ops.hmatmul import make_hmatmul_model
from dehm_onnx.ops.library import make_session


def _gaussian(n=128, seed=0):
    return np.random.default_rng(seed).standard_normal((n, n)).astype(np.float32)


def _data_and_layout(model):
    inits = {t.name: t for t in model.graph.initializer}
    data = next(t for name, t in inits.items() if name.endswith(".data"))
    layout = next(t for name, t in inits.items() if name.endswith(".layout"))
    return data, layout


@pytest.mark.parametrize(("precision", "tol"), [("float", 0.1), ("int8", 1e-2), ("int4", 0.1), ("auto", 1e-2)])
def test_emit_custom_picks_the_layout_version_and_matches(precision, tol):
    hm = compress(_gaussian(), tol, precision=precision)
    model = layer_model(hm, "custom", ["b", 128], np.float32)
    onnx.checker.check_model(model)
    data, layout = _data_and_layout(model)
    quantized = not all(b.is_float for b in hm.blocks)
    assert quantized == (precision != "float")
    assert data.data_type == (onnx.TensorProto.UINT8 if quantized else onnx.TensorProto.FLOAT)
    assert list(layout.dims)[1] == (8 if quantized else 7)
    x = np.random.default_rng(1).standard_normal((3, 128)).astype(np.float32)
    y = make_session(model).run(None, {"X": x})[0]
    ref = hm.matmul(x.astype(np.float64))
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize(("precision", "tol", "most"), [("int8", 1e-2, 0.35), ("int4", 0.1, 0.2)])
def test_v2_custom_file_is_smaller_than_v1(tmp_path, precision, tol, most):
    """Measured on the saved files: v2 keeps the int8/int4 bytes that v1 expands to float32."""
    hm = compress(_gaussian(), tol, precision=precision)
    assert hm.precision_counts() and all(precision in k for k in hm.precision_counts())
    v1, v2 = tmp_path / "v1.onnx", tmp_path / "v2.onnx"
    onnx.save(make_hmatmul_model(pack(hm)), v1)
    onnx.save(layer_model(hm, "custom", ["b", 128], np.float32), v2)
    ratio = v2.stat().st_size / v1.stat().st_size
    assert ratio < most, f"{precision}: v2 file {v2.stat().st_size} B is {ratio:.3f} of v1 {v1.stat().st_size} B"
    assert v2.stat().st_size < 1.05 * hm.nbytes + 2000  # the file is the H-matrix's bytes plus a small frame


@pytest.mark.parametrize("case", CASES_V2, ids=[c.name for c in CASES_V2])
def test_emit_custom_runs_the_quantized_table(case):
    """The conformance table's quantized cases through ``--emit custom`` (layout v2) and the kernel."""
    lead = [f"d{i}" for i in range(case.x.ndim - 1)]
    model = layer_model(case.hm, "custom", [*lead, case.hm.shape[0]], case.x.dtype, "layer.w.hm")
    onnx.checker.check_model(model)
    data, _ = _data_and_layout(model)
    assert data.data_type == onnx.TensorProto.UINT8
    assert_matches(case, make_session(model).run(None, {"X": case.x})[0])
