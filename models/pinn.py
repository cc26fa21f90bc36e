"""A physics-informed network (PINN) for the 1-D Poisson problem, trained and exported to ONNX.

Problem: ``u''(x) = f(x)`` on ``[0, 1]``, ``u(0) = u(1) = 0``, with the exact solution
``u(x) = sin(pi x) + 0.25 sin(4 pi x)`` (so ``f = -pi^2 sin(pi x) - 4 pi^2 sin(4 pi x)``).
The network is an MLP ``1 -> W -> W -> W -> 1`` with tanh activations (``W = width``, 256 by
default), trained in float32 on CPU with Adam on the PDE residual at random collocation points plus the
boundary conditions. Its hidden weights (W x W) are the MatMul/Gemm layers that compression
touches.

Needs torch (``pip install torch==2.13.0``); torch is never a dependency of dehm_onnx.

Command line: ``python models/pinn.py OUT.onnx [--width 256] [--steps 2000]`` trains, exports
and prints the solution error.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

__all__ = ["exact_solution", "make_pinn", "train_pinn", "export_pinn", "solution_error"]


def exact_solution(x: np.ndarray) -> np.ndarray:
    """``u(x) = sin(pi x) + 0.25 sin(4 pi x)``."""
    return np.sin(np.pi * x) + 0.25 * np.sin(4 * np.pi * x)


def _rhs(x):
    import torch

    return -(math.pi**2) * torch.sin(math.pi * x) - 4 * math.pi**2 * torch.sin(4 * math.pi * x)


def make_pinn(width: int = 256, depth: int = 3, seed: int = 0):
    """The MLP ``1 -> width (x depth) -> 1`` with tanh, seeded."""
    import torch

    torch.manual_seed(seed)
    layers, size = [], 1
    for _ in range(depth):
        layers += [torch.nn.Linear(size, width), torch.nn.Tanh()]
        size = width
    layers.append(torch.nn.Linear(size, 1))
    return torch.nn.Sequential(*layers)


def _residual_loss(net, x):
    import torch

    x = x.requires_grad_(True)
    u = net(x)
    (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    (d2u,) = torch.autograd.grad(du.sum(), x, create_graph=True)
    return torch.mean((d2u - _rhs(x)) ** 2)


def train_pinn(net, steps: int = 2000, points: int = 256, seed: int = 0, log_every: int = 0) -> float:
    """Train with Adam (cosine-decayed learning rate); returns the seconds it took."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=1e-5)
    boundary = torch.tensor([[0.0], [1.0]])
    start = time.perf_counter()
    for step in range(steps):
        x = torch.rand(points, 1, generator=generator)
        loss = _residual_loss(net, x) + 100.0 * torch.mean(net(boundary) ** 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if log_every and step % log_every == 0:
            print(f"step {step}: loss {loss.item():.3e}")
    return time.perf_counter() - start


def export_pinn(net, path) -> None:
    """Export ``u = net(x)`` (x of shape [batch, 1], float32) with the TorchScript exporter."""
    import torch

    torch.onnx.export(
        net.eval(),
        (torch.zeros(4, 1),),
        str(path),
        input_names=["x"],
        output_names=["u"],
        dynamic_axes={"x": {0: "batch"}, "u": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )


def solution_error(u: np.ndarray, x: np.ndarray) -> tuple:
    """``(relative L2, max abs)`` error of ``u`` against the exact solution at ``x``."""
    exact = exact_solution(x.astype(np.float64))
    diff = u.astype(np.float64).ravel() - exact.ravel()
    return float(np.linalg.norm(diff) / np.linalg.norm(exact)), float(np.max(np.abs(diff)))


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="the .onnx file to write")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)  # measured faster than 2 threads for this small float32 network
    net = make_pinn(args.width)
    seconds = train_pinn(net, args.steps, log_every=500)
    x = np.linspace(0, 1, 1001)[:, None]
    with torch.no_grad():
        u = net(torch.from_numpy(x).float()).numpy()
    rel, mx = solution_error(u, x)
    print(f"trained in {seconds:.1f} s: relative L2 error {rel:.2e}, max error {mx:.2e}")
    export_pinn(net, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
