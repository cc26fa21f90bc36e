"""compare on operator models: integral operators and a Gaussian-process posterior mean.

Run by hand:  python benchmarks/bench_compare_operators.py [--n 2048] [--tols 1e-4 1e-3 1e-2]
              [--emit custom --methods original dehm svd]   (dehm timed with the HMatMul kernel)

Each model is one MatMul ``y = x @ K`` with a constant kernel matrix K (float32), input
``x`` of shape [1, n]:

* ``log1d``: K_ij = h * log|s_i - s_j| on n sorted points s in [0, 1] (h = 1/n; the diagonal
  holds the cell average h*(log(h/2) - 1) of the singular kernel) — a 1-D single-layer
  potential, the textbook H-matrix case;
* ``exp1d``: K_ij = h * exp(-|s_i - s_j| / 0.1), a 1-D Matérn-1/2 covariance operator;
* ``inv_r2d``: K_ij = h^2 / sqrt(|p_i - p_j|^2 + h^2) on a 32 x 64 grid of the unit square
  (n = 2048 points, row-major order), a regularised 2-D 1/r potential;
* ``gp_mean``: the posterior mean of a Gaussian process with an RBF kernel (length 0.15) and
  n fixed training points in the unit square, evaluated on a 32 x 32 test grid:
  ``m(X*) = k(X*, X) alpha`` written as ``alpha @ K`` with K = k(X, X*) (n x 1024).

Calibration inputs are what these operators are applied to: for the integral operators,
8 smooth random functions (sums of 10 sines with random phases and 1/k amplitudes) sampled
at the points; for the GP, alpha = (k(X, X) + 1e-2 I)^-1 y for 8 noisy samples y of smooth
random functions at the training points.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from _compare_common import model_dir, run_compare
from dehm_onnx.compare import METHODS
from dehm_onnx.config import make_config

SAMPLES = 8


def matmul_model(k: np.ndarray, name: str) -> onnx.ModelProto:
    """``y = x @ K`` with K as a float32 initializer."""
    m, n = k.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "K"], ["y"], name=f"{name}_apply")],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, m])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(k.astype(np.float32), "K")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def log1d(n: int) -> tuple:
    s = np.sort(np.random.default_rng(0).uniform(0, 1, n))
    h = 1.0 / n
    d = np.abs(s[:, None] - s[None, :])
    np.fill_diagonal(d, 1.0)
    k = h * np.log(d)
    np.fill_diagonal(k, h * (np.log(h / 2) - 1))
    return k, s


def exp1d(n: int) -> tuple:
    s = np.sort(np.random.default_rng(1).uniform(0, 1, n))
    return np.exp(-np.abs(s[:, None] - s[None, :]) / 0.1) / n, s


def grid2d(n: int) -> np.ndarray:
    rows = 32
    cols = n // rows
    gy, gx = np.meshgrid(np.linspace(0, 1, rows), np.linspace(0, 1, cols), indexing="ij")
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def inv_r2d(n: int) -> tuple:
    p = grid2d(n)
    h = 1.0 / np.sqrt(n)
    r = np.linalg.norm(p[:, None, :] - p[None, :, :], axis=-1)
    return h * h / np.sqrt(r * r + h * h), p[:, 0] + 0.37 * p[:, 1]


def smooth_functions(t: np.ndarray, rng) -> np.ndarray:
    """SAMPLES smooth random functions of the coordinate t, shape (SAMPLES, 1, len(t))."""
    k = np.arange(1, 11)
    amp = rng.standard_normal((SAMPLES, 10)) / k
    phase = rng.uniform(0, 2 * np.pi, (SAMPLES, 10))
    values = np.einsum("sk,skn->sn", amp, np.sin(np.pi * k[None, :, None] * t[None, None, :] + phase[:, :, None]))
    return values[:, None, :].astype(np.float32)


def rbf(a: np.ndarray, b: np.ndarray, length: float) -> np.ndarray:
    d2 = np.sum((a[:, None, :] - b[None, :, :]) ** 2, axis=-1)
    return np.exp(-d2 / (2 * length**2))


def gp_mean(n: int) -> tuple:
    rng = np.random.default_rng(2)
    x_train = rng.uniform(0, 1, (n, 2))
    g = np.linspace(0, 1, 32)
    gx, gy = np.meshgrid(g, g, indexing="ij")
    x_test = np.stack([gx.ravel(), gy.ravel()], axis=1)
    length, noise = 0.15, 1e-2
    k_test = rbf(x_train, x_test, length)  # n x 1024, so that m(X*) = alpha @ k(X, X*)
    k_train = rbf(x_train, x_train, length) + noise * np.eye(n)
    y = smooth_functions(x_train[:, 0] + 0.5 * x_train[:, 1], rng)[:, 0, :]
    y = y + 0.05 * rng.standard_normal(y.shape)
    alpha = np.linalg.solve(k_train, y.T.astype(np.float64)).T
    return k_test, alpha[:, None, :].astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--tols", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--only", nargs="*", default=None, help="run only these models")
    parser.add_argument("--emit", default="ops", help="dehm's emission mode (ops, function, custom)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="methods to compare")
    args = parser.parse_args()
    config = make_config(None, emit=args.emit)
    suffix = "" if args.emit in ("ops", "subgraph") else f"_{args.emit}"
    rng = np.random.default_rng(3)
    cases = {
        "log1d": lambda: (lambda k, t: (k, smooth_functions(t, rng)))(*log1d(args.n)),
        "exp1d": lambda: (lambda k, t: (k, smooth_functions(t, rng)))(*exp1d(args.n)),
        "inv_r2d": lambda: (lambda k, t: (k, smooth_functions(t, rng)))(*inv_r2d(args.n)),
        "gp_mean": lambda: gp_mean(args.n),
    }
    titles = {
        "log1d": f"1-D log-kernel integral operator, {args.n} x {args.n}",
        "exp1d": f"1-D exp(-|s-t|/0.1) covariance operator, {args.n} x {args.n}",
        "inv_r2d": f"2-D regularised 1/r operator on a 32 x {args.n // 32} grid, {args.n} x {args.n}",
        "gp_mean": f"GP posterior mean (RBF, {args.n} training points, 32 x 32 test grid), {args.n} x 1024",
    }
    for name, make in cases.items():
        if args.only and name not in args.only:
            continue
        k, calib = make()
        folder = model_dir(f"operators_{name}")
        path = folder / f"{name}.onnx"
        onnx.save(matmul_model(k, name), path)
        title = titles[name] + ("" if not suffix else f", dehm emitted as {args.emit!r}")
        run_compare(
            path, f"operators_{name}{suffix}", title,
            tols=args.tols, methods=args.methods, calibration={"x": calib}, rounds=args.rounds, config=config,
        )


if __name__ == "__main__":
    main()
