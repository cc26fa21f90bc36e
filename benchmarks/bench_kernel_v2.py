"""HMatMul layout v2 (storage kept) vs layout v1 (dequantized to float32) vs dense, on one weight.

The weight is bench_kernel.py's 4096x4096 log kernel, compressed with
``compress(W, tol, precision=...)`` (default ``auto``). The same H-matrix is written as an
``HMatMul`` model in layout v1 (every array dequantized to float32) and in layout v2 (every
array in its float16/int8/int4 storage), and, as today's baseline, the H-matrix of
``precision="float"`` in layout v1. Prints the serialized model bytes of each and a table of
median latencies (bench_kernel.py's alternating timer, one onnxruntime session each).

    python benchmarks/bench_kernel_v2.py [--size 4096] [--tol 1e-4] [--precision auto]
                                         [--batches 1 256] [--threads 2] [--seconds 6]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_kernel import dense_model, log_kernel, print_table, session  # noqa: E402
from dehm_onnx.hmatrix import compress, pack  # noqa: E402
from dehm_onnx.ops import hmatmul  # noqa: E402


def _compress(w, tol, precision):
    t0 = time.perf_counter()
    hm = compress(w, tol, precision=precision)
    print(f"precision {precision}: {hm.precision_counts()}, nbytes {hm.nbytes} ({hm.byte_ratio:.4f} of dense), "
          f"rel. certified error {hm.rel_certified_error:.2e}, compress {time.perf_counter() - t0:.1f} s", flush=True)
    return hm


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=6.0, help="time budget per batch size")
    args = parser.parse_args(argv)

    w = log_kernel(args.size)
    print(f"W: {args.size}x{args.size} log kernel, tol {args.tol:g}; onnxruntime {ort.__version__}, "
          f"intra_op_num_threads={args.threads}")
    hm = _compress(w, args.tol, args.precision)
    hm_float = _compress(w, args.tol, "float")
    models = {
        "dense": dense_model(w),
        "v1 float H": hmatmul.make_hmatmul_model(pack(hm_float)),
        f"v1 {args.precision} H": hmatmul.make_hmatmul_model(pack(hm)),
        f"v2 {args.precision} H": hmatmul.make_hmatmul_model(pack(hm, version=2)),
    }
    dense_bytes = len(models["dense"].SerializeToString())
    print("\n| model | file bytes | of dense |\n|---|---|---|")
    for name, model in models.items():
        size = len(model.SerializeToString())
        print(f"| {name} | {size} | {size / dense_bytes:.4f} |")
    print()
    sessions = {name: session(model, args.threads, name != "dense") for name, model in models.items()}
    x_all = np.random.default_rng(1).standard_normal((max(args.batches), args.size)).astype(np.float32)
    ref = sessions["dense"].run(None, {"X": x_all[:4]})[0]
    for name, s in sessions.items():
        err = np.linalg.norm(s.run(None, {"X": x_all[:4]})[0] - ref) / np.linalg.norm(ref)
        print(f"{name}: relative output error vs dense {err:.2e}")
    print()
    print_table(sessions, x_all, args.batches, args.seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
