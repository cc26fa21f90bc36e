"""compare on a PINN (1-D Poisson, models/pinn.py): solution error and NTK drift per method.

Run by hand:  python benchmarks/bench_compare_pinn.py [--steps 2000] [--tols 1e-3 1e-2 1e-1 3e-1]

1. Trains the PINN (MLP 1 -> 256 -> 256 -> 256 -> 1, tanh; float32, CPU, one thread) and
   exports it to ONNX (torch; benchmark only).
2. ``compare`` on 8 calibration samples of 64 points each in [0, 1] (docs/compare/pinn.*).
3. Solution error of every method's model (onnxruntime) against the exact solution on 1001
   points: relative L2 and max abs.
4. The empirical neural tangent kernel ``Theta = J J^T`` (J = du/dtheta over all parameters,
   torch autograd) on 64 points, for the original weights and for each method's effective
   hidden weights. A method's effective weight is read from its ONNX model by running the
   layer alone on the identity and on zero (``W = f(I) - f(0)``, exact for affine layers);
   int8 quantizes activations at run time, so it has no fixed weight and no NTK row.
   Drift: ``||lambda' - lambda||_2 / ||lambda||_2`` over all eigenvalues, the relative change
   of the largest eigenvalue, the largest relative change among the top 10, and
   ``||Theta' - Theta||_F / ||Theta||_F``.
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import onnx

from _compare_common import model_dir, run_compare
from dehm_onnx.verify.runner import extract_layer_model, make_cpu_session
from models import pinn

NTK_POINTS = 64


def solution_errors(result, x: np.ndarray) -> list:
    """Markdown rows: method, relative L2 and max error of the solution."""
    rows = []
    for label, path in result.models.items():
        session = make_cpu_session(onnx.load(str(path)))
        u = session.run(["u"], {"x": x.astype(np.float32)})[0]
        rel, mx = pinn.solution_error(u, x)
        rows.append(f"| {label} | {rel:.2e} | {mx:.2e} |")
    return rows


def hidden_layers(model: onnx.ModelProto) -> list:
    """``(torch module index, x name, output name)`` of the 256 x 256 Gemms (weights ``k.weight``)."""
    init = {t.name: t for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type == "Gemm" and node.input[1] in init and list(init[node.input[1]].dims) == [256, 256]:
            out.append((int(node.input[1].split(".")[0]), node.input[0], node.output[0]))
    return out


def effective_weight(model: onnx.ModelProto, x_name: str, y_name: str, width: int) -> np.ndarray | None:
    """W (Y = X @ W orientation) of an affine layer of ``model``, or None if it cannot be cut out."""
    layer = extract_layer_model(model, x_name, y_name, np.float32)
    if layer is None:
        return None
    session = make_cpu_session(layer)
    eye = np.eye(width, dtype=np.float32)
    y_eye = session.run([y_name], {x_name: eye})[0].astype(np.float64)
    y_zero = session.run([y_name], {x_name: np.zeros_like(eye)})[0].astype(np.float64)
    return y_eye - y_zero


def ntk_eigenvalues(net, x) -> tuple:
    """Eigenvalues (descending) and the matrix of the empirical NTK of ``net`` at points ``x``."""
    import torch

    params = [p for p in net.parameters()]
    rows = []
    for i in range(x.shape[0]):
        out = net(x[i : i + 1]).sum()
        grads = torch.autograd.grad(out, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double())
    jac = torch.stack(rows)
    theta = (jac @ jac.T).numpy()
    return np.sort(np.linalg.eigvalsh(theta))[::-1], theta


def ntk_rows(net, result, base_model: onnx.ModelProto) -> list:
    import torch

    x = torch.linspace(0, 1, NTK_POINTS).reshape(-1, 1)
    lam0, theta0 = ntk_eigenvalues(net, x)
    rows = [f"| original | {lam0[0]:.4e} | 0 | 0 | 0 | 0 |"]
    layers = hidden_layers(base_model)
    for label, path in result.models.items():
        if label in ("original", "int8"):
            continue
        model = onnx.load(str(path))
        compressed = copy.deepcopy(net)
        ok = True
        for index, x_name, y_name in layers:
            w = effective_weight(model, x_name, y_name, 256)
            if w is None:
                ok = False
                break
            with torch.no_grad():
                compressed[index].weight.copy_(torch.from_numpy(w.T.astype(np.float32)))
        if not ok:
            rows.append(f"| {label} | — | layer cannot be cut out | | | |")
            continue
        lam, theta = ntk_eigenvalues(compressed, x)
        drift = np.linalg.norm(lam - lam0) / np.linalg.norm(lam0)
        top = np.max(np.abs(lam[:10] - lam0[:10]) / lam0[:10])
        theta_rel = np.linalg.norm(theta - theta0) / np.linalg.norm(theta0)
        rows.append(
            f"| {label} | {lam[0]:.4e} | {drift:.2e} | {abs(lam[0] - lam0[0]) / lam0[0]:.2e} | {top:.2e} | {theta_rel:.2e} |"
        )
    return rows


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--tols", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1, 3e-1])
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args()
    torch.set_num_threads(1)
    net = pinn.make_pinn(256)
    seconds = pinn.train_pinn(net, args.steps)
    path = model_dir("pinn") / "pinn.onnx"
    pinn.export_pinn(net, path)
    print(f"PINN trained in {seconds:.1f} s ({args.steps} Adam steps)")
    grid = np.linspace(0, 1, NTK_POINTS * 8)
    calib = np.random.default_rng(0).permutation(grid).reshape(8, NTK_POINTS, 1).astype(np.float32)
    result = run_compare(
        path, "pinn", "PINN for u'' = f on [0, 1] (MLP 1-256-256-256-1, tanh)",
        tols=args.tols, calibration={"x": calib}, rounds=args.rounds,
    )
    x = np.linspace(0, 1, 1001)[:, None]
    print("\n#### Solution error against the exact solution (1001 points)\n")
    print("| method | relative L2 error | max abs error |\n|---|---:|---:|")
    print("\n".join(solution_errors(result, x)))
    print(f"\n#### Empirical NTK on {NTK_POINTS} points (all parameters)\n")
    print("| method | largest eigenvalue | eigenvalue drift (rel. L2) | largest eigenvalue change | max change, top 10 | Theta change (rel. Frobenius) |")
    print("|---|---:|---:|---:|---:|---:|")
    net.eval()
    print("\n".join(ntk_rows(net, result, onnx.load(str(path)))))


if __name__ == "__main__":
    main()
