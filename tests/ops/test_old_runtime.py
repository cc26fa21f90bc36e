"""The library in an older onnxruntime: it asks for C API 16, so onnxruntime 1.20 registers and
runs it (it used to ask for the headers' 21 and crash the process); a runtime older than the
library needs gets one line from ``custom_op_library()``, and stock onnxruntime still runs
the ``function`` fallback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import dehm_onnx
from dehm_onnx.ops import library
from models.make_demo import build as build_demo

OLD_ORT = "1.20.1"
REPO = Path(__file__).resolve().parents[2]

# Runs in a separate process whose onnxruntime is OLD_ORT (its folder first on PYTHONPATH).
OLD_RUNTIME_SCRIPT = r"""
import sys
import numpy as np
import onnxruntime as ort
import dehm_onnx

folder = sys.argv[1]
x = np.load(f"{folder}/x.npy")
out = {"version": np.array(ort.__version__)}
for name in ("custom", "function", "function_one_layer", "subgraph"):
    path = f"{folder}/{name}.onnx"
    if name != "function_one_layer" and name != "subgraph":
        out[f"{name}_library"] = dehm_onnx.make_session(path, threads=1).run(None, {"x": x})[0]
    if name != "custom" and name != "function":
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        out[f"{name}_stock"] = session.run(None, {"x": x})[0]
np.savez(f"{folder}/out.npz", **out)
"""


def _old_onnxruntime() -> Path:
    """onnxruntime OLD_ORT installed (without dependencies) into a cached folder."""
    cache = Path(os.environ.get("DEHM_CACHE") or Path.home() / ".cache" / "dehm_onnx")
    target = cache / f"onnxruntime-{OLD_ORT}"
    if not (target / "onnxruntime").is_dir():
        partial = cache / f"onnxruntime-{OLD_ORT}.partial"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                        "--target", str(partial), f"onnxruntime=={OLD_ORT}"], check=True)
        partial.rename(target)
    return target


def _keep_layer(model: onnx.ModelProto, layer: str) -> onnx.ModelProto:
    """A copy of a demo model optimized with only ``layer`` compressed (one function overload)."""
    return dehm_onnx.optimize(model, emit="function", include=(layer,))[0]


@pytest.mark.slow
def test_library_registers_and_runs_in_onnxruntime_1_20(tmp_path):
    demo = build_demo()
    x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    expected = {}
    for mode in ("custom", "function", "subgraph"):
        model = dehm_onnx.optimize(demo, emit=mode)[0]
        onnx.save(model, tmp_path / f"{mode}.onnx")
        expected[mode] = dehm_onnx.make_session(model, threads=1).run(None, {"x": x})[0]
    one_layer = _keep_layer(demo, "smooth*")
    # one HMatMul overload (layout v2 with the default precision: plus the decoders it calls)
    assert [f.name for f in one_layer.functions if not f.name.startswith("Decode")] == ["HMatMul"]
    onnx.save(one_layer, tmp_path / "function_one_layer.onnx")
    expected["function_one_layer"] = dehm_onnx.make_session(one_layer, threads=1).run(None, {"x": x})[0]
    library.custom_op_library()  # built once here, so the old runtime's process finds it up to date

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(_old_onnxruntime()), str(REPO)]))
    proc = subprocess.run([sys.executable, "-c", OLD_RUNTIME_SCRIPT, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    out = np.load(tmp_path / "out.npz")
    assert str(out["version"]) == OLD_ORT
    for key in ("custom_library", "function_library", "function_one_layer_stock", "subgraph_stock"):
        mode = key.rsplit("_", 1)[0]
        np.testing.assert_allclose(out[key], expected[mode], rtol=1e-5, atol=1e-6, err_msg=key)


def test_runtime_older_than_the_library_is_one_line_error():
    with pytest.raises(library.CustomOpRuntimeError, match=r"onnxruntime 1\.15\.1 .* C API version 15, .* needs 16") as info:
        library.check_runtime(16, "1.15.1")
    assert "\n" not in str(info.value)
    assert isinstance(info.value, library.CustomOpBuildError)  # callers that fall back keep working


@pytest.mark.parametrize("version", ["1.16.0", "1.20.1", "1.32.0", "2.0.0", "1.33.0.dev20260101", "unknown"])
def test_runtime_new_enough_or_unknown_passes(version):
    library.check_runtime(16, version)


def test_built_library_asks_for_api_16():
    assert library.required_ort_api(library.custom_op_library()) == 16
