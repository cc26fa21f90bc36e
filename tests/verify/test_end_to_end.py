"""Issue 11, items 6 and 13: the model checked end to end by default; unreachable targets."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import dehm_onnx
from dehm_onnx.cli import main as cli_main
from dehm_onnx.errors import BoundViolation

from ._models import gp_model, graded_matrix, mlp


def _outputs(model, xs):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.array([session.run(["mean", "std"], {"x": x}) for x in xs])[..., 0, 0]


@pytest.fixture(scope="module")
def gp(tmp_path_factory):
    """The GP model, 16 calibration inputs and 200 held-out inputs, all from its training domain."""
    folder = tmp_path_factory.mktemp("gp")
    model = gp_model()
    calib = folder / "domain.npz"
    np.savez(calib, x=np.random.default_rng(1).uniform(0, 10, (16, 1, 1)))
    held_out = np.random.default_rng(5).uniform(0, 10, (200, 1, 1))
    return model, str(calib), held_out, _outputs(model, held_out)


def test_layer_bounds_alone_miss_the_gp_std_error(gp):
    """What main did by default: K^-1 passes its layer bound, and the std output is far off."""
    model, calib, held_out, reference = gp
    opt, report = dehm_onnx.optimize(model, tol=1e-2, calibration=calib, no_model_check=True)
    (layer,) = report.compressed
    assert layer.name == "kinv_product" and layer.measured_error <= layer.tol_out
    std_error = np.max(np.abs(_outputs(opt, held_out)[:, 1] - reference[:, 1]) / reference[:, 1])
    assert std_error > 0.1


def test_default_run_meets_the_model_tolerance_or_keeps_kinv_dense(gp):
    model, calib, held_out, reference = gp
    opt, report = dehm_onnx.optimize(model, tol=1e-2, calibration=calib)
    errors = np.abs(_outputs(opt, held_out) - reference) / np.abs(reference)
    layer = next(r for r in report.layers if r.name == "kinv_product")
    if layer.compressed:
        assert errors.max() <= 1e-2
    else:
        assert layer.skip_reason == "MODEL_ERROR_TARGET" and "output 'std'" in layer.reason
        assert errors.max() == 0.0
    assert report.verification["model_tol"] == 1e-2


def test_model_check_tightens_every_layer_until_the_outputs_hold():
    """A chain of layers each within tol_out whose errors add up past it at the output."""
    rng = np.random.default_rng(7)
    orig = mlp([graded_matrix(rng, 96, 96, 0.8) for _ in range(4)])
    loose, loose_report = dehm_onnx.optimize(orig, tol=2e-2, min_size=8, no_model_check=True)
    result = loose_report.verification["result"]
    loose_error = max(o["worst"] for o in result["outputs"])
    assert loose_error > 2e-2  # every layer holds 2e-2, the output does not
    opt, report = dehm_onnx.optimize(orig, tol=2e-2, min_size=8)
    outputs = report.verification["result"]["outputs"]
    assert max(max(o["worst"], o["worst_held_out"]) for o in outputs) <= 2e-2
    assert any("model output" in s["why"] for s in report.verification["tightened"])
    assert all(r.tol < 2e-2 for r in report.compressed)
    assert "per-layer tol" in report.to_table() or len({r.tol for r in report.compressed}) == 1


def test_unreachable_max_model_error_says_so_and_exits_1(tmp_path, capsys):
    rng = np.random.default_rng(7)
    orig = mlp([graded_matrix(rng, 96, 96, 0.85), graded_matrix(rng, 96, 64, 0.85)])
    with pytest.raises(BoundViolation, match="max_model_error 1.00e-09 is not reachable by compressing anything"):
        dehm_onnx.optimize(orig, max_model_error=1e-9, min_size=8)
    opt, report = dehm_onnx.optimize(orig, max_model_error=1e-9, min_size=8, accept_dense=True)
    assert not report.compressed
    for record in report.layers:
        assert record.skip_reason == "MODEL_ERROR_TARGET" and "not reachable by compressing anything" in record.reason
        assert "--exclude" not in record.reason
    path, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(orig, path)
    assert cli_main(["optimize", str(path), str(out), "--max-model-error", "1e-9", "--min-size", "8"]) == 1
    assert not out.exists() and "not reachable by compressing anything" in capsys.readouterr().err
    assert cli_main(["optimize", str(path), str(out), "--max-model-error", "1e-9", "--min-size", "8",
                     "--accept-dense", "-q"]) == 0 and out.exists()


def test_report_header_shows_the_tols_actually_used():
    rng = np.random.default_rng(7)
    orig = mlp([graded_matrix(rng, 96, 96, 0.85), graded_matrix(rng, 96, 96, 0.85), graded_matrix(rng, 96, 64, 0.85)])
    _, report = dehm_onnx.optimize(orig, max_model_error=0.02, min_size=8, tol=0.5)
    tols = sorted({r.tol for r in report.compressed})
    header = report.to_table()
    assert "tol=5.00e-01" not in header
    if len(tols) > 1:
        assert f"per-layer tol {tols[0]:.2e}..{tols[-1]:.2e}" in header
    else:
        assert f"tol={tols[0]:.2e}" in header


def test_generated_calibration_is_announced_in_the_summary():
    rng = np.random.default_rng(7)
    orig = mlp([graded_matrix(rng, 96, 96, 0.85)])
    _, report = dehm_onnx.optimize(orig, tol=0.05, min_size=8)
    table = report.to_table()
    assert "WARNING: calibration inputs were GENERATED, not given" in table
    assert "x: standard normal N(0, 1)" in table
    assert json.loads(report.to_json())["verification"]["generated"] is True
