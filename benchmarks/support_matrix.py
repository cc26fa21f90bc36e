"""Which onnxruntime versions run what dehm_onnx writes: each version in its own throwaway
virtual environment (numpy and that onnxruntime only), on this machine's CPU.

Columns, all on CPUExecutionProvider, for the demo model (``models/make_demo.py``,
two compressed layers) optimized here with this checkout:
(a) stock onnxruntime: the defaults (``--emit auto --precision auto``), ``--precision int8``
    (integers in the form onnxruntime fuses), ``--emit subgraph``; ``--emit function`` with one compressed layer
    (one function overload) and with both (two overloads of ``HMatMul``);
(b) the HMatMul library (this checkout's build, or the bundled one): registration, then
    ``--emit custom`` and ``--emit function`` with the library;
(c) hand-built ``DequantizeLinear(W_q, scales) -> MatMul`` blocks of the form the quantized
    emission will write (opset 21, IR 10, symmetric, no zero point): int4 and int8 with
    ``axis=0, block_size=32`` (scales ``[K/32, N]``), and int8 per-axis (``axis=1``), on a
    K x N = SIZE x SIZE weight at batch 1: whether onnxruntime's optimizer fused the block
    into ``MatMulNBits`` (read from the graph written to ``optimized_model_filepath``), and
    the median time against the float32 ``MatMul`` on the same weight, run alternately in one
    process (2 threads, spinning off).
A cell reads "ok (error)" with the relative L2 error against the expected output (the host's
run of the same file for (a) and (b), ``x @ dequantized W`` in float64 for (c)), or the
first line of the error.

Usage: ``python benchmarks/support_matrix.py [--versions 1.15.1 1.20.1 1.27.0 1.32.0]
[--size 4096] [--work DIR]``; the venvs are kept in WORK (default
``$DEHM_CACHE/support-matrix``) for the next run. Needs PyPI access.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import dehm_onnx  # noqa: E402
from models.make_demo import build as build_demo  # noqa: E402

DEFAULT_VERSIONS = ("1.15.1", "1.20.1", "1.27.0", "1.32.0")
BLOCK = 32


def write_demo(folder: Path) -> None:
    demo = build_demo()
    x = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    expected = {}
    variants = {
        "auto": dict(),  # the defaults: --emit auto --precision auto
        "int8": dict(precision="int8"),  # integers written for onnxruntime's fused kernel
        "subgraph": dict(emit="subgraph"),
        "function": dict(emit="function"),
        "custom": dict(emit="custom"),
        "function_one_layer": dict(emit="function", include=("smooth*",)),
    }
    for name, kw in variants.items():
        model = dehm_onnx.optimize(demo, **kw)[0]
        onnx.save(model, folder / f"demo.{name}.onnx")
        expected[f"expected.{name}"] = dehm_onnx.make_session(model, threads=1).run(None, {"x": x})[0]
    np.savez(folder / "demo.npz", x=x, **expected)


def quantize(w: np.ndarray, bits: int, axis_blocks: bool) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric quantization: blocks of BLOCK rows per column, or one scale per column."""
    qmax = 2 ** (bits - 1) - 1
    k, n = w.shape
    if axis_blocks:
        absmax = np.abs(w.reshape(k // BLOCK, BLOCK, n)).max(axis=1)
        scales = (absmax / qmax).astype(np.float32)
        q = np.clip(np.round(w / np.repeat(scales, BLOCK, axis=0)), -qmax - 1, qmax).astype(np.int8)
    else:
        scales = (np.abs(w).max(axis=0) / qmax).astype(np.float32)
        q = np.clip(np.round(w / scales), -qmax - 1, qmax).astype(np.int8)
    return q, scales


def quant_model(q: np.ndarray, scales: np.ndarray, bits: int, axis_blocks: bool) -> onnx.ModelProto:
    k, n = q.shape
    if bits == 4:
        weight = helper.make_tensor("W_q", TensorProto.INT4, [k, n], q.ravel().tolist())
    else:
        weight = numpy_helper.from_array(q, "W_q")
    attrs = {"axis": 0, "block_size": BLOCK} if axis_blocks else {"axis": 1}
    nodes = [helper.make_node("DequantizeLinear", ["W_q", "scales"], ["W"], **attrs),
             helper.make_node("MatMul", ["x", "W"], ["y"])]
    return _model(nodes, [weight, numpy_helper.from_array(scales, "scales")], k, n)


def _model(nodes, initializers, k: int, n: int) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def write_quantized(folder: Path, size: int) -> None:
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32)
    x = rng.standard_normal((1, size)).astype(np.float32)
    expected = {"expected.float": x.astype(np.float64) @ w}
    onnx.save(_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [numpy_helper.from_array(w, "W")], size, size),
              folder / "quant.float.onnx")
    for name, bits, blocks in (("int4_block32", 4, True), ("int8_block32", 8, True), ("int8_axis", 8, False)):
        q, scales = quantize(w, bits, blocks)
        onnx.save(quant_model(q, scales, bits, blocks), folder / f"quant.{name}.onnx")
        deq = q.astype(np.float64) * (np.repeat(scales, BLOCK, axis=0) if blocks else scales)
        expected[f"expected.{name}"] = x.astype(np.float64) @ deq
    np.savez(folder / "quant.npz", x=x, **expected)


def venv_python(work: Path, version: str) -> Path:
    """A venv holding numpy and onnxruntime ``version`` only (made once, then reused)."""
    venv = work / "venvs" / f"onnxruntime-{version}"
    python = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        minor = int(version.split(".")[1])
        numpy = "numpy<2" if minor < 19 else "numpy"  # onnxruntime < 1.19 is built against numpy 1.x
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        f"onnxruntime=={version}", numpy], check=True)
        (venv / ".complete").touch()
    return python


def op_types(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(path, load_external_data=False).graph.node] if path.exists() else []


def cell(r: dict | None) -> str:
    if r is None:
        return "—"
    if not r["ok"]:
        return f"no: {r['error'][:160]}"
    return f"ok ({r['error']:.1e})" if "error" in r else "ok"


def quant_cells(r: dict, ops: list[str], float_ms: float | None, short: bool = False) -> str:
    """``becomes | ms (speedup) | error`` (``ms | error`` when short) of one quantized block."""
    if not r["ok"]:
        return ("" if short else "— | ") + f"fails: {r['error'][:100]} | —"
    speed = f"{r['ms']:.2f}" + (f" ({float_ms:.2f}: {float_ms / r['ms']:.1f}x)" if float_ms and not short else "")
    if short:
        return f"{speed} | {r['error']:.1e}"
    becomes = "MatMulNBits" if "MatMulNBits" in ops else " + ".join(ops) or "?"
    return f"{becomes} | {speed} | {r['error']:.1e}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", nargs="+", default=list(DEFAULT_VERSIONS))
    parser.add_argument("--size", type=int, default=4096, help="K = N of the quantized blocks (default 4096)")
    parser.add_argument("--rounds", type=int, default=30, help="timed runs of each quantized model")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args(argv)
    cache = Path(os.environ.get("DEHM_CACHE") or Path.home() / ".cache" / "dehm_onnx")
    work = (args.work or cache / "support-matrix").resolve()
    (work / "models").mkdir(parents=True, exist_ok=True)
    library = dehm_onnx.custom_op_library()
    write_demo(work / "models")
    write_quantized(work / "models", args.size)

    results = {}
    for version in args.versions:
        out = work / "results" / version
        out.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([str(venv_python(work, version)), str(REPO / "benchmarks" / "_support_worker.py"),
                               str(work), str(library), str(out / "result.json"), str(args.rounds)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            results[version] = {"crashed": f"exit code {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
            continue
        results[version] = json.loads((out / "result.json").read_text())
        results[version]["ops"] = {p.stem: op_types(p) for p in (out / "optimized").glob("*.onnx")}

    print(f"dehm_onnx support matrix (CPU, this machine; library {library.name}, C API "
          f"{dehm_onnx.ops.library.required_ort_api(library)}; quantized blocks {args.size}x{args.size}, batch 1)\n")
    print("| onnxruntime | (a) defaults (auto) | (a) --precision int8 | (a) subgraph | (a) function, 1 overload | "
          "(a) function, 2 overloads | (b) library registers | (b) custom (layout v2) + library | (b) function + library |")
    print("|---|---|---|---|---|---|---|---|---|")
    for version, r in results.items():
        if "crashed" in r:
            print(f"| {version} | worker crashed: {r['crashed']} | | | | | | | |")
            continue
        e = r["emission"]
        print(f"| {version} | {cell(e.get('stock.auto'))} | {cell(e.get('stock.int8'))} | {cell(e['stock.subgraph'])} | {cell(e['stock.function_one_layer'])} | "
              f"{cell(e['stock.function'])} | {cell(e['register'])} | {cell(e.get('library.custom'))} | "
              f"{cell(e.get('library.function'))} |")
    print("\n| onnxruntime | (c) block | becomes | ms (float32 MatMul ms: speedup) | rel. error | "
          "accuracy_level 0: ms | rel. error |")
    print("|---|---|---|---|---|---|---|")
    for version, r in results.items():
        if "crashed" in r:
            continue
        q, ops = r["quantized"], r["ops"]
        float_ms = q["float"].get("ms") if q["float"]["ok"] else None
        for name in ("int4_block32", "int8_block32", "int8_axis"):
            print(f"| {version} | {name} | " + quant_cells(q[name], ops.get(name, []), float_ms) + " | "
                  + quant_cells(q[name + ".acc0"], [], float_ms, short=True) + " |")
    (work / "matrix.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
