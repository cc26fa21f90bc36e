"""Runs inside a throwaway venv holding one onnxruntime version (numpy and onnxruntime only);
called by ``benchmarks/support_matrix.py``, which wrote the models and reads the JSON.

Usage: ``_support_worker.py WORK LIBRARY OUT.json``.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def first_line(e: Exception) -> str:
    """The reason onnxruntime gave, without its error-code and file-path prefixes."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"^Load model from \S+ failed:", "", text).strip()
    # Older releases put the C++ source location and signature first.
    return re.sub(r"^/\S+\.cc:\d+ \S.*?\)\s(?=[A-Z][a-z])", "", text)[:300]


def options(threads: int = 1) -> ort.SessionOptions:
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return o


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def run_file(path: Path, feeds: dict, o: ort.SessionOptions) -> dict:
    try:
        y = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        return {"ok": True, "y": y}
    except Exception as e:  # noqa: BLE001 - the matrix records what failed and how
        return {"ok": False, "error": first_line(e)}


def emission(work: Path, library: str) -> dict:
    data = np.load(work / "models" / "demo.npz")
    feeds = {"x": data["x"]}
    out = {}
    for name in ("auto", "int8", "subgraph", "function", "function_one_layer"):
        r = run_file(work / "models" / f"demo.{name}.onnx", feeds, options())
        if r["ok"]:
            r = {"ok": True, "error": rel_l2(r["y"], data[f"expected.{name}"])}
        out[f"stock.{name}"] = r
    o = options()
    try:
        o.register_custom_ops_library(library)
    except Exception as e:  # noqa: BLE001
        out["register"] = {"ok": False, "error": first_line(e)}
        return out
    out["register"] = {"ok": True}
    for name in ("custom", "function"):
        r = run_file(work / "models" / f"demo.{name}.onnx", feeds, o)
        if r["ok"]:
            r = {"ok": True, "error": rel_l2(r["y"], data[f"expected.{name}"])}
        out[f"library.{name}"] = r
    return out


def quantized(work: Path, opt_dir: Path, rounds: int) -> dict:
    data = np.load(work / "models" / "quant.npz")
    feeds = {"x": data["x"]}
    sessions, out = {}, {}
    # Each block twice: onnxruntime's defaults, and with the fused MatMulNBits told to keep
    # float activations (its default accuracy level 4 quantizes X to int8).
    runs = [("float", "float", None)] + [
        (f"{name}{suffix}", name, level)
        for name in ("int4_block32", "int8_block32", "int8_axis")
        for suffix, level in (("", None), (".acc0", "0"))
    ]
    for key, name, level in runs:
        o = options(threads=2)
        if level is not None:
            o.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", level)
        o.optimized_model_filepath = str(opt_dir / f"{key}.onnx")
        try:
            sessions[key] = ort.InferenceSession(str(work / "models" / f"quant.{name}.onnx"), o,
                                                 providers=["CPUExecutionProvider"])
            y = sessions[key].run(None, feeds)[0]
            out[key] = {"ok": True, "error": rel_l2(y, data[f"expected.{name}"])}
        except Exception as e:  # noqa: BLE001
            out[key] = {"ok": False, "error": first_line(e)}
    times = {name: [] for name in sessions}
    for _ in range(rounds):  # alternate, so load changes on a shared machine hit all alike
        for name, session in sessions.items():
            t = time.perf_counter()
            session.run(None, feeds)
            times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
        out[name]["ms"] = 1e3 * float(np.median(ts))
    return out


def main(argv) -> int:
    work, library, result = Path(argv[1]), argv[2], Path(argv[3])
    opt_dir = result.parent / "optimized"
    opt_dir.mkdir(parents=True, exist_ok=True)
    out = {"onnxruntime": ort.__version__, "numpy": np.__version__}
    out["emission"] = emission(work, library)
    out["quantized"] = quantized(work, opt_dir, int(argv[4]) if len(argv) > 4 else 30)
    result.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
