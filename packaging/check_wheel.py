"""Check an installed dehm_onnx wheel: the bundled HMatMul library loads and computes.

Run by ``packaging/check_wheel.sh`` with the wheel's venv Python, from outside any checkout
and with neither CMake nor a C++ compiler on PATH, so the library can only come from the
wheel. Exits 0 and prints one line per check; exits 1 at the first failure.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np


def fail(msg: str) -> None:
    print(f"FAIL: {msg}")
    sys.exit(1)


def main() -> int:
    import onnxruntime

    import dehm_onnx
    from dehm_onnx.hmatrix import compress, pack
    from dehm_onnx.ops import hmatmul, library

    tools = {t: shutil.which(t) for t in ("cmake", "c++", "g++", "gcc", "clang++", "cc")}
    if any(tools.values()):
        fail(f"a build tool is on PATH: {tools}")
    print(f"no cmake or C++ compiler on PATH; onnxruntime {onnxruntime.__version__}")

    package = Path(dehm_onnx.__file__).resolve().parent
    if not package.is_relative_to(Path(sys.prefix).resolve()):
        fail(f"dehm_onnx imported from {package}, not from the venv {sys.prefix}")
    if library.source_dir().is_dir():
        fail(f"sources found at {library.source_dir()}: this is not an installed wheel")

    path = dehm_onnx.custom_op_library()
    if path != library.bundled_library():
        fail(f"custom_op_library() returned {path}, not the bundled {library.bundled_library()}")
    print(f"custom_op_library() -> {path} (C API {library.required_ort_api(path)})")

    points = np.linspace(0.0, 1.0, 300)
    w = np.log(np.abs(points[:, None] - points[None, :200] - 0.0013) + 1e-3).astype(np.float32)
    hm = compress(w, 1e-4)
    x = np.random.default_rng(0).standard_normal((5, 300)).astype(np.float32)
    y = dehm_onnx.make_session(hmatmul.make_hmatmul_model(pack(hm))).run(None, {"X": x})[0]
    ref = hm.matmul(x.astype(np.float64))
    err = float(np.abs(y - ref).max() / np.abs(ref).max())
    if not err < 1e-5:
        fail(f"HMatMul through the bundled library differs from the numpy reference: {err:.2e}")
    print(f"make_session(HMatMul model) matches the numpy reference (max rel. error {err:.1e})")
    print("wheel check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
