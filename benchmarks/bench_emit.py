"""Standard-op emission on stock onnxruntime: nodes, speed against dense, and file bytes.

    python benchmarks/bench_emit.py speed [--size 4096] [--tol 1e-4] [--emit ops [function ...]] [--precision auto]
                                          [--threads 2]
                                          [--blocks 7] [--runs 20]
    python benchmarks/bench_emit.py bytes [--size 1024] [--tols 1e-2 0.1]
    python benchmarks/bench_emit.py modes [--asr]

``speed``: the log kernel of ``bench_kernel.log_kernel`` as one MatMul, optimized by
``dehm_onnx.optimize`` (each ``--emit`` mode, default precision, no verification) and timed
against the dense MatMul at batch 1 and 256, every session in one alternation: stock
onnxruntime, ``--threads`` intra-op threads, spinning off, one warm-up run, then ``--blocks``
alternating blocks of ``--runs`` runs per session; the median over all timed runs is printed
with the ratio dense / compressed (> 1: faster). The median time to create each session
(loading, function inlining, constant folding) is printed too.

``bytes``: a Gaussian ``size x size`` float32 weight (seed 0) as one MatMul, optimized at each
tol (default precision and emission), and the whole serialized file's bytes against the
original file's.

``modes``: the demo model (``models/make_demo.py``) and a two-user shared-weight model,
optimized at the default tol in every emit mode (no verification), and the default emission
with ``--precision fp16``: whole-file bytes, and each over the smallest. ``--asr`` adds the
onnx-asr 0.12.0 whisper128, nemo128 and kaldi preprocessors at ``max_model_error=1e-3``
(verified end to end on generated inputs, as ``optimize`` does by default).
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from bench_kernel import dense_model, log_kernel

import dehm_onnx


def stock_session(model, threads: int) -> ort.InferenceSession:
    """A CPU session with ``threads`` intra-op threads and spinning off."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def session_nodes(model, threads: int) -> collections.Counter:
    """Op types of the graph onnxruntime runs (constants folded) under the same options."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.optimized_model_filepath = os.path.join(tmp, "session.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def creation_seconds(model, threads: int, repeats: int = 3) -> float:
    """Median seconds to create a stock session for ``model`` (load, inlining, folding)."""
    data = model.SerializeToString()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def alternating_medians(runners: dict, blocks: int, runs: int) -> dict:
    """Median seconds per call of each runner over ``blocks`` alternating blocks of ``runs`` calls."""
    times = {name: [] for name in runners}
    for run in runners.values():
        run()
    for _ in range(blocks):
        for name, run in runners.items():
            for _ in range(runs):
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _optimized(dense, args, emit: str):
    """``dense`` optimized with ``--emit emit``; prints what the file holds and what runs."""
    t0 = time.perf_counter()
    model, report = dehm_onnx.optimize(dense, tol=args.tol, emit=emit, precision=args.precision, no_verify=True)
    (record,) = report.layers
    ops = collections.Counter(n.op_type for n in model.graph.node)
    print(f"log kernel {args.size}^2 tol {args.tol:g} --emit {emit} --precision {args.precision}: optimized in {time.perf_counter() - t0:.1f} s")
    print(f"  {record.emit} {record.family}, {len(model.graph.node)} nodes in the file {dict(ops)}")
    print(f"  whole file {len(model.SerializeToString())} bytes (dense file {len(dense.SerializeToString())})")
    run_ops = session_nodes(model, args.threads)
    print(f"  {sum(run_ops.values())} nodes after onnxruntime's load-time folding {dict(run_ops)}")
    print(f"  bytes {record.bytes_before} -> {record.bytes_after} ({record.byte_ratio:.4f}x), "
          f"precision {record.precision}, cert. error {record.rel_certified_error:.2e}")
    return model


def speed(args) -> None:
    w = log_kernel(args.size)
    dense = dense_model(w)
    models = {"dense": dense, **{emit: _optimized(dense, args, emit) for emit in args.emit}}
    sessions = {name: stock_session(m, args.threads) for name, m in models.items()}
    created = ", ".join(f"{name} {creation_seconds(m, args.threads):.3f} s" for name, m in models.items())
    print(f"session creation (median of 3): {created}")
    rng = np.random.default_rng(1)
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, spinning off, "
          f"{args.blocks} alternating blocks of {args.runs} runs")
    for batch in args.batches:
        x = rng.standard_normal((batch, args.size)).astype(np.float32)
        y_ref = sessions["dense"].run(None, {"X": x})[0]
        runners = {name: (lambda s=s: s.run(None, {"X": x})) for name, s in sessions.items()}
        med = alternating_medians(runners, args.blocks, args.runs)
        cells = []
        for emit in args.emit:
            y = sessions[emit].run(None, {"X": x})[0]
            err = float(np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref))
            cells.append(f"{emit} {med[emit] * 1e3:.3f} ms, {med['dense'] / med[emit]:.2f}x dense (rel. output error {err:.1e})")
        print(f"  batch {batch:4d}: dense {med['dense'] * 1e3:.3f} ms; " + "; ".join(cells))


def file_bytes(args) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((args.size, args.size)).astype(np.float32)
    dense = dense_model(w)
    before = len(dense.SerializeToString())
    for tol in args.tols:
        model, report = dehm_onnx.optimize(dense, tol=tol, no_verify=True)
        after = len(model.SerializeToString())
        (record,) = report.layers
        mix = record.precision if record.compressed else f"kept dense: {record.reason}"
        print(f"gaussian {args.size}^2 tol {tol:g}: file {before} -> {after} bytes ({after / before:.4f}x); "
              f"{record.emit} {record.family}, {record.nodes} nodes, {mix}")


def shared_weight_model(size: int = 512):
    """``y = relu(x @ W) @ W`` with one smooth-kernel ``W`` read by both MatMuls."""
    from onnx import TensorProto, helper, numpy_helper

    s = np.linspace(0.0, 1.0, size)
    w = (1.0 / (1.0 + 10.0 * np.abs(s[:, None] - s[None, :]))).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["X", "W"], ["h"], name="a"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W"], ["Y"], name="b")]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["B", size])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["B", size])],
                              [numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def modes(args) -> None:
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(root / "models"), str(root)]
    import make_demo

    cases = [("demo", make_demo.build(), {"no_verify": True}), ("shared 512^2 kernel", shared_weight_model(), {"no_verify": True})]
    if args.asr:
        from models.fetch import fetch_wheel_member

        for name in ("whisper128", "nemo128", "kaldi"):
            path = fetch_wheel_member("onnx-asr", "0.12.0", f"onnx_asr/preprocessors/data/{name}.onnx")
            cases.append((name, onnx.load(path), {"max_model_error": 1e-3}))
    for name, model, options in cases:
        sizes = {}
        for label, emit, precision in (("auto", "auto", "auto"), ("auto fp16", "auto", "fp16"), ("ops", "ops", "auto"),
                                       ("function", "function", "auto"), ("custom", "custom", "auto")):
            try:
                out, _ = dehm_onnx.optimize(model, emit=emit, precision=precision, **options)
            except ValueError as e:  # a mode that refuses this precision
                print(f"{name}: {label}: {e}")
                continue
            sizes[label] = len(out.SerializeToString())
        smallest = min(sizes.values())
        cells = ", ".join(f"{emit} {size} ({size / smallest:.3f})" for emit, size in sizes.items())
        print(f"{name}: original {len(model.SerializeToString())} bytes; {cells}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("speed")
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--emit", nargs="+", default=["ops"], help="one or more emit modes, timed alternately")
    p.add_argument("--precision", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    p.add_argument("--blocks", type=int, default=7)
    p.add_argument("--runs", type=int, default=20)
    p.set_defaults(func=speed)
    p = sub.add_parser("bytes")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--tols", type=float, nargs="+", default=[1e-2, 0.1])
    p.set_defaults(func=file_bytes)
    p = sub.add_parser("modes")
    p.add_argument("--asr", action="store_true", help="add the onnx-asr preprocessors (verified, slower)")
    p.set_defaults(func=modes)
    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
