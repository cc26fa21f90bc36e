"""aarch64 half of the edge check (``benchmarks/edge_check.sh``), run under qemu-user with
only numpy, onnxruntime and the dehm_onnx aarch64 wheel installed.

Checks, on what ``benchmarks/edge_prepare.py`` wrote into FOLDER:
1. ``dehm_onnx.custom_op_library()`` returns the library bundled in the wheel;
2. the HMatMul conformance table through that library: every entry within its tolerance;
3. each model (demo, whisper128, PINN) in every emit mode, stock and with the library,
   against the original model run here on the same inputs (relative L2 error of each
   output), and against the host's (x86-64) output of the same file and runtime.

Prints the tables and exits 1 if any check fails. Usage: ``edge_run.py FOLDER``.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

import dehm_onnx
from dehm_onnx.ops import library

RUNS = (("original", False), ("auto", False), ("subgraph", False), ("function", False), ("function", True),
        ("custom", True))
HOST_AGREEMENT = 1e-4  # relative L2 between this machine's and the host's output of one file
# Files with integer arrays written for MatMulNBits: its default accuracy level quantizes the
# activations to 8 bits (about 5e-3 relative error against float, dehm_onnx.config
# FUSED_INT_ACTIVATION_ERROR), and the x86-64 and aarch64 kernels need not round alike.
FUSED_AGREEMENT = 6e-3


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def check_library() -> bool:
    path = dehm_onnx.custom_op_library()
    bundled = path == library.bundled_library()
    print(f"machine {platform.machine()}, onnxruntime {ort.__version__}, numpy {np.__version__}")
    print(f"custom_op_library() -> {path} ({'bundled in the wheel' if bundled else 'NOT the bundled library'})")
    return bundled


def check_cases(folder: Path) -> bool:
    print("\n| case | X | dtype | max error / tolerance | result |\n|---|---|---|---|---|")
    ok = True
    for model in sorted((folder / "cases").glob("*.onnx")):
        data = np.load(model.with_suffix(".npz"))
        y = dehm_onnx.make_session(model, threads=2).run(None, {"X": data["x"]})[0]
        err = np.abs(y.astype(np.float64) - data["expected"])
        worst = float(np.max(err / data["tolerance"])) if err.size else 0.0
        good = y.shape == data["expected"].shape and y.dtype == data["x"].dtype and worst <= 1.0
        ok &= good
        print(f"| {model.stem} | {tuple(data['x'].shape)} | {data['x'].dtype} | {worst:.3f} | {'pass' if good else 'FAIL'} |")
    return ok


def run(path: Path, feeds: dict, with_library: bool) -> list:
    if with_library:
        return dehm_onnx.make_session(path, threads=2).run(None, feeds)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def check_models(folder: Path) -> bool:
    print("\n| model | emit | runtime | rel. L2 error vs original (aarch64) | same on x86-64 | aarch64 vs x86-64, same file | result |")
    print("|---|---|---|---|---|---|---|")
    ok = True
    for npz in sorted((folder / "models").glob("*.npz")):
        name = npz.stem
        data = np.load(npz)
        feeds = {k[len("input."):]: data[k] for k in data.files if k.startswith("input.")}
        original = run(folder / "models" / f"{name}.original.onnx", feeds, False)
        host_original = [data[f"host.original.stock.{i}"] for i in range(len(original))]
        for mode, with_library in RUNS[1:]:
            runtime = "library" if with_library else "stock"
            try:
                outputs = run(folder / "models" / f"{name}.{mode}.onnx", feeds, with_library)
            except Exception as e:  # noqa: BLE001 - reported in the table
                ok = False
                print(f"| {name} | {mode} | {runtime} | error: {str(e).splitlines()[0][:120]} | | | FAIL |")
                continue
            host = [data[f"host.{mode}.{runtime}.{i}"] for i in range(len(outputs))]
            err = max(rel_l2(y, y0) for y, y0 in zip(outputs, original))
            host_err = max(rel_l2(y, y0) for y, y0 in zip(host, host_original))
            agree = max(rel_l2(y, h) for y, h in zip(outputs, host))
            fused = f"fused.{mode}" in data.files and bool(data[f"fused.{mode}"])
            good = agree <= (FUSED_AGREEMENT if fused else HOST_AGREEMENT) and err <= 1.5 * host_err + 1e-6
            ok &= good
            print(f"| {name} | {mode} | {runtime} | {err:.2e} | {host_err:.2e} | {agree:.1e} | {'pass' if good else 'FAIL'} |")
    return ok


def main(argv) -> int:
    folder = Path(argv[1])
    results = [check_library(), check_cases(folder), check_models(folder)]
    print("\nedge check:", "passed" if all(results) else "FAILED")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
