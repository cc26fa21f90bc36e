"""Where the batch-1 time of HMatMul goes: per-run cost, factors in cache, factors from memory.

    python benchmarks/bench_batch1.py [--size 4096] [--tol 1e-4] [--library OTHER.so ...]

One thread (``intra_op_num_threads=1``, spinning off), medians of alternating runs:

- ``Identity``: a model of one Identity node, back to back and right after a dense
  4096x4096 MatMul (64 MB), which evicts onnxruntime's and Python's own data and code too;
- ``per-run``: HMatMul on an 8x8 layer (onnxruntime + Python cost of one run), likewise;
- ``hot``: the 4096x4096 log-kernel layer run back to back (its factors stay in cache);
- ``cold``: the same layer right after the dense MatMul.

``--library`` adds builds of the library to compare side by side in the same process
(A/B of kernel changes: build the old source into another folder and pass its .so).
The memory side alone: ``cc -O2 -mavx2 benchmarks/stream_probe.c -o stream_probe && ./stream_probe``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from bench_kernel import dense_model, log_kernel
from onnx import TensorProto, helper

from dehm_onnx.hmatrix import compress, pack
from dehm_onnx.ops import hmatmul
from dehm_onnx.ops.library import custom_op_library


def one_thread_session(model, library: str | None = None):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if library:
        options.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def identity_model(width: int):
    graph = helper.make_graph([helper.make_node("Identity", ["X"], ["Y"])], "identity",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, width])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, width])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def medians_us(sessions: dict, x: np.ndarray, repeats: int, before=None) -> dict:
    """Median microseconds per run of each session, interleaved; ``before`` runs untimed first."""
    times = {name: [] for name in sessions}
    for _ in range(repeats):
        for name, s in sessions.items():
            if before is not None:
                before()
            t0 = time.perf_counter()
            s.run(None, {"X": x})
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) * 1e6 for name, ts in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--repeats", type=int, default=400)
    parser.add_argument("--library", nargs="*", default=[], help="other builds of the library to compare")
    args = parser.parse_args(argv)

    libraries = {"this build": str(custom_op_library())}
    libraries.update({f"library {i + 1}": path for i, path in enumerate(args.library)})
    w = log_kernel(args.size)
    layer = hmatmul.make_hmatmul_model(pack(compress(w, args.tol)))
    tiny = hmatmul.make_hmatmul_model(pack(compress(np.eye(8, dtype=np.float32), args.tol)))
    dense = one_thread_session(dense_model(w))
    x = np.random.default_rng(1).standard_normal((1, args.size)).astype(np.float32)
    x8 = np.ones((1, 8), np.float32)
    evict = lambda: dense.run(None, {"X": x})  # noqa: E731 - streams the 64 MB weight

    identity = {"identity": one_thread_session(identity_model(8))}  # no library: one column serves all
    tinies = {k: one_thread_session(tiny, v) for k, v in libraries.items()}
    same_for_all = lambda med: dict.fromkeys(libraries, med["identity"])  # noqa: E731
    rows = {
        "Identity model, back to back": same_for_all(medians_us(identity, x8, args.repeats * 5)),
        "Identity model, after dense": same_for_all(medians_us(identity, x8, args.repeats, before=evict)),
        "per-run (8x8 layer)": medians_us(tinies, x8, args.repeats * 5),
        "per-run (8x8 layer), after dense": medians_us(tinies, x8, args.repeats, before=evict),
        "hot (back to back)": medians_us({k: one_thread_session(layer, v) for k, v in libraries.items()}, x,
                                         args.repeats),
        "cold (after dense)": medians_us({k: one_thread_session(layer, v) for k, v in libraries.items()}, x,
                                         args.repeats, before=evict),
    }
    print(f"batch 1, {args.size}x{args.size} log kernel at tol {args.tol:g}, one thread, medians in µs\n")
    print("| what | " + " | ".join(libraries) + " |")
    print("|---|" + "---|" * len(libraries))
    for what, med in rows.items():
        print(f"| {what} | " + " | ".join(f"{med[k]:.1f}" for k in libraries) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
