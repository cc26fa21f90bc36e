"""Calibrate the emission cost model (``dehm_onnx/graph/cost.py``) on this machine.

    python benchmarks/bench_emit_cost.py [--sizes 512 1024 2048] [--tols 1e-2 1e-4]
                                         [--threads 2] [--blocks 3] [--runs 10]

For log kernels of each size compressed at each tol (float storage), it writes the dense
MatMul, the ``blocks`` family and the batched plans with the fewest bytes, the lowest and the
highest estimated time, and times each on stock onnxruntime (``--threads`` threads, spinning
off, alternating blocks of runs, medians) at batch 1 and 256. It then fits the six
coefficients of ``Cost.seconds`` by nonnegative least squares on relative error, and prints
them with the measured and predicted times under both the fitted and the shipped coefficients
(``cost.COEFFICIENTS``).
"""

from __future__ import annotations

import argparse

import numpy as np
from bench_emit import alternating_medians, stock_session
from bench_kernel import dense_model, log_kernel
from scipy.optimize import nnls

from dehm_onnx.graph.cost import COEFFICIENTS, batched_candidates, dense_cost
from dehm_onnx.graph.emit import EmitContext, layer_model
from dehm_onnx.graph.emit_ops import blocks_candidate
from dehm_onnx.hmatrix import compress

BATCHES = (1, 256)


def variants(hm) -> list[tuple[str, object, object]]:
    """(label, model, Cost) for the blocks family and a few batched plans of ``hm``."""
    context = EmitContext(x_rank=2, opset=21)
    x_shape = ["b", hm.shape[0]]
    out = []
    blocks = blocks_candidate(hm, np.float32, context)
    out.append(("blocks", layer_model(hm, "ops", x_shape, np.float32, opset=21,
                                      context=EmitContext(x_rank=2, opset=21, family="blocks")), blocks.cost))
    dense = dense_cost(*hm.shape)
    batched = batched_candidates(hm, np.float32, context)
    picks = {}
    if batched:
        picks["batched-smallest"] = min(batched, key=lambda c: c.nbytes)
        picks["batched-fastest"] = min(batched, key=lambda c: c.score(dense))
        picks["batched-slowest"] = max(batched, key=lambda c: c.score(dense))
    for label, cand in picks.items():
        ctx = EmitContext(x_rank=2, opset=21, family="batched", options=cand.plan.options)
        out.append((label, layer_model(hm, "ops", x_shape, np.float32, opset=21, context=ctx), cand.cost))
    return out


def measure(args) -> list[tuple[str, int, list[float], float]]:
    """Rows (label, batch, features, measured seconds)."""
    rows = []
    rng = np.random.default_rng(0)
    for size in args.sizes:
        w = log_kernel(size)
        for tol in args.tols:
            hm = compress(w, tol, seed=0, precision="float")
            models = [("dense", dense_model(w), dense_cost(size, size))] + variants(hm)
            sessions = {label: stock_session(model, args.threads) for label, model, _ in models}
            for batch in BATCHES:
                x = rng.standard_normal((batch, size)).astype(np.float32)
                runners = {label: (lambda s=s: s.run(None, {"X": x})) for label, s in sessions.items()}
                med = alternating_medians(runners, args.blocks, args.runs)
                for label, _, cost in models:
                    rows.append((f"{size} {tol:g} {label}", batch, cost.features(batch), med[label]))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--tols", type=float, nargs="+", default=[1e-2, 1e-4])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args(argv)
    rows = measure(args)
    a = np.array([f for _, _, f, _ in rows])
    t = np.array([s for _, _, _, s in rows])
    fitted, _ = nnls(a / t[:, None], np.ones(len(t)))
    names = list(COEFFICIENTS)
    shipped = np.array([COEFFICIENTS[n] for n in names])
    print("coefficients (seconds per unit):")
    for name, f, s in zip(names, fitted, shipped):
        print(f"  {name:13s} fitted {f:.3g}  shipped {s:.3g}")
    print(f"{'variant':32s} {'batch':>5s} {'measured ms':>12s} {'fitted ms':>10s} {'shipped ms':>10s}")
    for (label, batch, _, seconds), pf, ps in zip(rows, a @ fitted, a @ shipped):
        print(f"{label:32s} {batch:5d} {seconds * 1e3:12.3f} {pf * 1e3:10.3f} {ps * 1e3:10.3f}")
    for name, coef in (("fitted", fitted), ("shipped", shipped)):
        rel = np.abs(a @ coef - t) / t
        print(f"{name}: median relative error {np.median(rel):.2f}, max {rel.max():.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
