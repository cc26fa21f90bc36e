"""HMatMul kernel vs onnxruntime's dense MatMul (and the standard-op fallbacks) on one weight.

The weight is a 4096x4096 log kernel W[i, j] = log|x_i - y_j| over two interleaved sorted
point sets, compressed with ``compress(W, tol)``. Every variant computes Y = X @ W(_H) in
its own onnxruntime session (intra_op_num_threads fixed, spinning off); the variants are
timed alternately in one process and the medians are reported, with ratios to dense.

    python benchmarks/bench_kernel.py [--size 4096] [--tol 1e-4] [--batches 1 16 256] [--no-demo]
                                      [--provider cpu|cuda] [--shared-pool] [--spin]
                                      [--chain L]

``--shared-pool`` gives every session onnxruntime's process-wide intra-op pool (as a
deployment with one pool for all sessions has) instead of a pool per session; ``--spin``
leaves intra-op spinning on (onnxruntime's default). ``--chain L`` adds a table for L such
layers in sequence in one session (W scaled by 1/||W||_2 so activations stay O(1)).

With ``--provider cuda`` (onnxruntime-gpu and a CUDA device) every session runs on the
CUDAExecutionProvider, X and Y stay on the device (I/O binding), and each timed run
includes onnxruntime's synchronisation at the end of ``run``.

The standard-op columns are the ``function`` emission of the same float H-matrix (its body on
stock onnxruntime) and ``dehm_onnx.optimize``'s default file of the weight (``--emit auto
--precision auto``, no verification) on stock onnxruntime.

A second table does the same for the demo model (``models/make_demo.py``) optimized with
``emit="function"``: the original model, the optimized file on stock onnxruntime (function
bodies) and the same file with the HMatMul library registered.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from dehm_onnx.hmatrix import compress, pack
from dehm_onnx.ops import hmatmul
from dehm_onnx.ops.library import custom_op_library

SESSION_CONFIG = {"session.intra_op.allow_spinning": "0"}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_SHARED_POOL = {"on": False}


def use_shared_pool(threads: int) -> None:
    """Give every later session onnxruntime's process-wide pool of ``threads`` intra-op threads."""
    from onnxruntime.capi import _pybind_state  # the pool sizes have no public Python setter

    _pybind_state.set_global_thread_pool_sizes(threads, 1)
    _SHARED_POOL["on"] = True


def log_kernel(size: int, seed: int = 0) -> np.ndarray:
    """``W[i, j] = log|x_i - y_j|``, x and y interleaved sorted uniform points on [0, 1]."""
    pts = np.sort(np.random.default_rng(seed).uniform(0.0, 1.0, 2 * size))
    return np.log(np.abs(pts[0::2, None] - pts[None, 1::2])).astype(np.float32)


def dense_model(w: np.ndarray):
    m, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])], "dense",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["b", m])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["b", n])],
        [numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def emitted_model(hm, mode: str):
    """A one-layer model from a registered emitter (None if the mode is not registered)."""
    from dehm_onnx.graph.emit import EMITTERS, layer_model

    if mode not in EMITTERS:
        return None
    return layer_model(hm, mode, ["b", hm.shape[0]], np.float32, prefix="w", opset=18)


def session(model, threads: int, library: bool, provider: str = "cpu"):
    """A session on one execution provider; on CUDA, a library session may not fall back to the CPU."""
    options = ort.SessionOptions()
    if _SHARED_POOL["on"]:
        options.use_per_session_threads = False  # the pool's size was set in use_shared_pool
    else:
        options.intra_op_num_threads = threads
    for key, value in SESSION_CONFIG.items():
        options.add_session_config_entry(key, value)
    if provider == "cuda" and library:
        # HMatMul must run on the CUDA kernel; stock sessions may place an op on the CPU.
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if library:
        options.register_custom_ops_library(str(custom_op_library()))
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=[PROVIDERS[provider]])
    if sess.get_providers()[0] != PROVIDERS[provider]:
        raise SystemExit(f"{PROVIDERS[provider]} is not available: {sess.get_providers()}")
    return sess


def make_runner(sess, x: np.ndarray, feed: str, provider: str):
    """A no-argument call that runs ``sess`` on ``x``; on CUDA, X and Y stay on the device."""
    if provider == "cpu":
        return lambda: sess.run(None, {feed: x})
    binding = sess.io_binding()
    binding.bind_ortvalue_input(feed, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x), "cuda", 0))
    for out in sess.get_outputs():
        binding.bind_output(out.name, "cuda", 0)
    return lambda: sess.run_with_iobinding(binding)


def print_table(sessions: dict, x_all: np.ndarray, batches, seconds: float, feed: str = "X",
                provider: str = "cpu") -> None:
    """Markdown table of medians (ms) and speedups over the session named first."""
    names = list(sessions)
    base, others = names[0], names[1:]
    print(f"| batch | {base} ms | " + " | ".join(f"{n} ms | speedup" for n in others) + " |")
    print("|" + "---|" * (2 + 2 * len(others)))
    for batch in batches:
        x = x_all[:batch]
        runners = {name: make_runner(s, x, feed, provider) for name, s in sessions.items()}
        t0 = time.perf_counter()
        runners[base]()
        one = max(time.perf_counter() - t0, 1e-5) * len(names)
        repeats = int(min(500, max(15, seconds / one)))
        med = time_alternating(runners, repeats)
        cells = " | ".join(f"{med[n] * 1e3:.3f} | {med[base] / med[n]:.2f}x" for n in others)
        print(f"| {batch} | {med[base] * 1e3:.3f} | {cells} |", flush=True)


def demo_table(args) -> None:
    import sys
    from pathlib import Path

    import dehm_onnx

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from models.make_demo import build

    original = build()
    optimized, report = dehm_onnx.optimize(original, emit="function")
    layers = ", ".join(f"{r.name} {r.params}/{r.dense_params}" for r in report.compressed)
    feed = original.graph.input[0].name
    width = original.graph.input[0].type.tensor_type.shape.dim[-1].dim_value
    print(f"\ndemo model (models/make_demo.py), optimize(emit='function'): compressed {layers} params\n")
    sessions = {"original": session(original, args.threads, False, args.provider),
                "function (stock ORT)": session(optimized, args.threads, False, args.provider),
                "function + library": session(optimized, args.threads, True, args.provider)}
    x_all = np.random.default_rng(2).standard_normal((max(args.batches), width)).astype(np.float32)
    print_table(sessions, x_all, args.batches, args.seconds, feed, args.provider)


def time_alternating(runners: dict, repeats: int) -> dict:
    """Median seconds per call of each runner, calls interleaved so noise hits all alike."""
    times = {name: [] for name in runners}
    for run in runners.values():  # warm-up
        run()
    for _ in range(repeats):
        for name, run in runners.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def device_name(provider: str) -> str:
    """`` on <GPU name>`` from nvidia-smi for CUDA runs, else empty."""
    if provider != "cuda":
        return ""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return f" on {out.splitlines()[0]}" if out else ""


def chain_models(w: np.ndarray, layers: int, tol: float):
    """A dense and an HMatMul model of ``layers`` copies of ``w`` applied in sequence."""
    w = (w / np.linalg.norm(w, 2)).astype(np.float32)
    packed = pack(compress(w, tol))
    size = w.shape[0]
    dense_nodes, hm_nodes, dense_inits, hm_inits = [], [], [], []
    for i in range(layers):
        src, dst = ("X" if i == 0 else f"h{i}"), ("Y" if i == layers - 1 else f"h{i + 1}")
        dense_inits.append(numpy_helper.from_array(w, f"W{i}"))
        dense_nodes.append(helper.make_node("MatMul", [src, f"W{i}"], [dst]))
        hm_inits += hmatmul.packed_initializers(packed, f"w{i}", dtype=np.float32)
        hm_nodes.append(hmatmul.make_hmatmul_node(src, [f"w{i}.{f}" for f in hmatmul.INPUTS[1:]], dst, name=f"hm{i}"))
    io = ([helper.make_tensor_value_info("X", TensorProto.FLOAT, ["b", size])],
          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["b", size])])
    opsets = [helper.make_opsetid("", 18), hmatmul.opset_import()]
    return tuple(helper.make_model(helper.make_graph(nodes, "chain", *io, inits), opset_imports=opsets, ir_version=10)
                 for nodes, inits in ((dense_nodes, dense_inits), (hm_nodes, hm_inits)))


def chain_table(args, w: np.ndarray) -> None:
    dense, hm = chain_models(w, args.chain, args.tol)
    print(f"\n{args.chain} layers in sequence, one session each:\n")
    sessions = {"dense": session(dense, args.threads, False, args.provider),
                "hmatmul": session(hm, args.threads, True, args.provider)}
    x_all = np.random.default_rng(3).standard_normal((max(args.batches), w.shape[0])).astype(np.float32)
    print_table(sessions, x_all, args.batches, args.seconds, provider=args.provider)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=6.0, help="time budget per batch size")
    parser.add_argument("--no-demo", dest="demo", action="store_false", help="skip the demo-model table")
    parser.add_argument("--kernel-only", action="store_true",
                        help="alternate only dense and HMatMul (no standard-op sessions in the rotation)")
    parser.add_argument("--provider", choices=sorted(PROVIDERS), default="cpu",
                        help="execution provider of every session (cuda: onnxruntime-gpu and a CUDA device)")
    parser.add_argument("--shared-pool", action="store_true",
                        help="one process-wide intra-op pool for all sessions instead of one per session")
    parser.add_argument("--spin", action="store_true", help="leave intra-op spinning on (onnxruntime's default)")
    parser.add_argument("--chain", type=int, default=0, metavar="L", help="also time L layers in sequence")
    args = parser.parse_args(argv)
    if args.spin:
        SESSION_CONFIG.pop("session.intra_op.allow_spinning", None)
    if args.shared_pool:
        use_shared_pool(args.threads)

    w = log_kernel(args.size)
    t0 = time.perf_counter()
    hm = compress(w, args.tol, precision="float")  # layout v1, as the kernel table has always measured
    build_s = time.perf_counter() - t0
    gain = hm.dense_params / hm.params
    print(f"W: {args.size}x{args.size} log kernel, tol {args.tol:g}: {hm.counts()}, max rank {hm.max_rank}, "
          f"params {hm.params} ({hm.ratio:.4f} of dense, gain {gain:.1f}x), "
          f"rel. certified error {hm.rel_certified_error:.2e}, compress {build_s:.1f} s")
    print(f"onnxruntime {ort.__version__}, {PROVIDERS[args.provider]}{device_name(args.provider)}, "
          f"intra_op_num_threads={args.threads}, {'shared pool' if args.shared_pool else 'pool per session'}, "
          f"{SESSION_CONFIG}\n")

    sessions = {"dense": session(dense_model(w), args.threads, False, args.provider),
                "hmatmul": session(hmatmul.make_hmatmul_model(pack(hm)), args.threads, True, args.provider)}
    modes = () if args.kernel_only else (("function", "function (stock ORT)"),)
    for mode, label in modes:
        model = emitted_model(hm, mode)
        if model is not None:
            sessions[label] = session(model, args.threads, False, args.provider)
    if not args.kernel_only:
        import dehm_onnx

        # What users run without the library: optimize's default file (precision and emission auto).
        default, _ = dehm_onnx.optimize(dense_model(w), tol=args.tol, no_verify=True)
        sessions["default file (stock ORT)"] = session(default, args.threads, False, args.provider)

    x_all = np.random.default_rng(1).standard_normal((max(args.batches), args.size)).astype(np.float32)
    ref = sessions["dense"].run(None, {"X": x_all[:1]})[0]
    for name, s in sessions.items():
        err = np.linalg.norm(s.run(None, {"X": x_all[:1]})[0] - ref) / np.linalg.norm(ref)
        assert err < 10 * args.tol, f"{name}: relative output error {err:.2e}"

    print_table(sessions, x_all, args.batches, args.seconds, provider=args.provider)
    print(f"\ntargets: batch 1 hmatmul speedup >= {0.5 * gain:.1f}x (0.5 x dense/stored params); "
          f"batch {max(args.batches)} hmatmul speedup >= 1.0x")
    if args.chain > 0:
        chain_table(args, w)
    if args.demo:
        demo_table(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
