"""The demo model of the README: generated, optimized by the CLI, within its bounds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx

import dehm_onnx
from models import make_demo
from tests.conftest import assert_layers_within_bound

ROOT = Path(__file__).resolve().parents[1]


def test_demo_model_layers_compress_as_designed(rng):
    model = make_demo.build()
    assert model.ByteSize() < 1_000_000
    optimized, report = dehm_onnx.optimize(model)
    status = {r.name: r.compressed for r in report.layers}
    assert status == {"smooth": True, "mel": True, "dense": True}
    assert report.layers[1].blocks["zero"] > 0  # the filterbank's band structure
    # The random layer has no structure: it is kept whole, in float16 (error ~3e-4 < tol).
    assert report.layers[2].precision == "dense fp16 x1" and report.layers[2].byte_ratio == 0.5
    assert all(r.bytes_after < r.bytes_before for r in report.layers)
    assert report.bytes_after < 0.3 * report.bytes_before
    assert_layers_within_bound(model, optimized, report, rng)


def test_demo_model_in_float_leaves_the_random_layer_dense():
    _, report = dehm_onnx.optimize(make_demo.build(), precision="float")
    status = {r.name: (r.compressed, r.skip_reason) for r in report.layers}
    assert status == {"smooth": (True, None), "mel": (True, None), "dense": (False, "NOT_SMALLER")}


def test_demo_commands_of_the_makefile(tmp_path):
    """The commands behind ``make demo`` (minus the pip install), in a scratch folder."""
    demo, out, report = tmp_path / "demo.onnx", tmp_path / "demo.opt.onnx", tmp_path / "report.json"
    subprocess.run([sys.executable, str(ROOT / "models" / "make_demo.py"), str(demo)], check=True, capture_output=True)
    proc = subprocess.run(
        [sys.executable, "-m", "dehm_onnx", "optimize", str(demo), str(out), "--report", str(report)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "smooth" in proc.stdout and "dense fp16 x1" in proc.stdout and "file bytes" in proc.stdout
    assert json.loads(report.read_text())["totals"]["compressed"] == 3
    onnx.checker.check_model(str(out))
    makefile = (ROOT / "Makefile").read_text()
    assert "models/make_demo.py models/demo.onnx" in makefile and "-m dehm_onnx optimize models/demo.onnx" in makefile


def test_demo_second_pass_changes_nothing():
    optimized, _ = dehm_onnx.optimize(make_demo.build())
    again, report = dehm_onnx.optimize(optimized)
    assert again.SerializeToString() == optimized.SerializeToString()
    assert report.layers == []  # every MatMul left is one the pass wrote
