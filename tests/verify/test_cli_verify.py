"""``python -m dehm_onnx verify``: exit 0 / 1 / 2, table on stdout, --report JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from ._models import graded_matrix, lowrank_optimized, mlp, scale_initializer


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dehm_onnx", "verify", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("verify_cli")
    rng = np.random.default_rng(0)
    orig = mlp([graded_matrix(rng, 64, 48, 0.8), graded_matrix(rng, 48, 32, 0.8)])
    opt = lowrank_optimized(orig, {"fc0": 0.05, "fc1": 0.05}, {"fc0": 0.15, "fc1": 0.15})
    paths = {"orig": tmp / "orig.onnx", "opt": tmp / "opt.onnx", "bad": tmp / "tampered.onnx"}
    onnx.save(orig, paths["orig"])
    onnx.save(opt, paths["opt"])
    onnx.save(scale_initializer(opt, "W0.u", 1.3), paths["bad"])
    np.savez(tmp / "calib.npz", x=rng.standard_normal((40, 16, 64)).astype(np.float32))
    np.savez(tmp / "wrong.npz", y=np.zeros((2, 1, 64), np.float32))
    paths.update(calib=tmp / "calib.npz", wrong=tmp / "wrong.npz", tmp=tmp)
    return paths


def test_cli_verify_good_model_exits_0_and_writes_report(files):
    report = files["tmp"] / "report.json"
    proc = _cli(files["orig"], files["opt"], "--calibration", files["calib"], "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert "fc0" in proc.stdout and "fc1" in proc.stdout and "all layer bounds hold" in proc.stdout
    data = json.loads(report.read_text())
    assert data["ok"] is True and data["num_samples"] == 40 and len(data["layers"]) == 2


def test_cli_verify_tampered_model_exits_1_naming_the_layer(files):
    report = files["tmp"] / "bad.json"
    proc = _cli(files["orig"], files["bad"], "--input-shape", "x=4x64", "--report", report)
    assert proc.returncode == 1
    assert "layer 'fc0'" in proc.stderr and "(worst sample) > tol_out 1.500e-01" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "VIOLATED" in proc.stdout
    assert json.loads(report.read_text())["ok"] is False


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--calibration", "wrong.npz"], "missing input"),
        (["--input-shape", "x=1x63"], "fixes it to 64"),
        (["--input-range", "x=3"], "NAME=LO:HI"),
        (["--num-samples", "0"], "num_samples must be an integer >= 1, got 0"),
        (["--input-shape", "x=0x64"], "zero-size axis"),
        (["--num-samples", "1000000000"], "lower --num-samples"),
    ],
)
def test_cli_verify_bad_input_exits_2(files, extra, match):
    extra = [str(files["tmp"] / e) if e.endswith(".npz") else e for e in extra]
    proc = _cli(files["orig"], files["opt"], *extra)
    assert proc.returncode == 2 and match in proc.stderr and "Traceback" not in proc.stderr


def test_cli_verify_missing_model_or_metadata_exits_2(files):
    proc = _cli(files["tmp"] / "absent.onnx", files["opt"])
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    stripped = onnx.load(files["opt"])
    del stripped.metadata_props[:]
    onnx.save(stripped, files["tmp"] / "no_metadata.onnx")
    proc = _cli(files["orig"], files["tmp"] / "no_metadata.onnx")
    assert proc.returncode == 2 and "dehm.layers" in proc.stderr


def test_cli_verify_of_a_model_never_optimized_exits_2(files):
    proc = _cli(files["orig"], files["orig"])
    assert proc.returncode == 2
    assert "OPT has no compressed layers (no dehm.layers metadata)" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "all layer bounds hold" not in proc.stdout
