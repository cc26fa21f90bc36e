"""Export small torch models with each exporter setting and optimize them: where do weights come from?

Run by hand (needs torch==2.13.0 and, for the dynamo exporter, onnxscript; neither is a
dependency of the package):

    python benchmarks/check_exporters.py [--out FOLDER]

Every model's weights are smooth kernels, so each one compresses. For each export the script
prints, per MatMul/Gemm layer, the weight's ``source`` as the report gives it (how the
exporter wrote it: initializer, ``transpose(initializer)``, ``cast(initializer float16)``,
``identity(initializer)``, an inlined function argument, ...), whether it was compressed,
and the largest relative error of the optimized model's outputs against the original's in
stock onnxruntime on random inputs. ``tests/graph/test_sources.py`` builds the same graph
shapes by hand, so the test suite needs no torch.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N_IN, N_OUT = 96, 80


def _kernel(rows: int, cols: int, shift: float = 0.0):
    import torch

    x = torch.linspace(0, 1, rows)[:, None]
    y = torch.linspace(0, 1, cols)[None, :]
    return torch.exp(-((x - y - shift) / 0.5) ** 2) / rows


def _models():
    """``(label, module, example input, export options)`` for each exporter setting."""
    import torch
    from torch import nn

    class Linear2d(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(N_IN, N_OUT)
            with torch.no_grad():
                self.fc.weight.copy_(_kernel(N_OUT, N_IN))

        def forward(self, x):
            return self.fc(x)

    class Half(nn.Module):
        """A half-precision parameter used as float32 (``.float()``), reshaped to 2-D."""

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(_kernel(N_IN, N_OUT).reshape(N_IN, 2, N_OUT // 2).half())

        def forward(self, x):
            return x @ self.w.float().reshape(N_IN, N_OUT)

    class Tied(nn.Module):
        """Two layers sharing one weight (tied)."""

        def __init__(self):
            super().__init__()
            self.a = nn.Linear(N_IN, N_IN, bias=False)
            self.b = nn.Linear(N_IN, N_IN, bias=False)
            with torch.no_grad():
                self.a.weight.copy_(_kernel(N_IN, N_IN))
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    class Functions(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(N_IN, N_IN)
            self.fc2 = nn.Linear(N_IN, N_OUT)
            with torch.no_grad():
                self.fc1.weight.copy_(_kernel(N_IN, N_IN))
                self.fc2.weight.copy_(_kernel(N_OUT, N_IN, 0.1))

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    x2, x3 = torch.randn(4, N_IN), torch.randn(2, 4, N_IN)
    return [
        ("dynamo, nn.Linear on 2-D input", Linear2d(), x2, {"dynamo": True}),
        ("dynamo, nn.Linear on 3-D input", Linear2d(), x3, {"dynamo": True}),
        ("dynamo optimize=False, nn.Linear on 3-D input", Linear2d(), x3, {"dynamo": True, "optimize": False}),
        ("dynamo, half parameter .float(), reshaped", Half(), x2, {"dynamo": True}),
        ("dynamo optimize=False, half parameter .float(), reshaped", Half(), x2, {"dynamo": True, "optimize": False}),
        ("legacy, tied weights", Tied(), x2, {"dynamo": False}),
        ("legacy, export_modules_as_functions=True", Functions(), x2,
         {"dynamo": False, "export_modules_as_functions": True, "opset_version": 17}),
    ]


def _export(module, x, path: Path, options: dict) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (x,), str(path), input_names=["x"], **options)


def _max_rel_error(original: Path, optimized, feed: dict) -> float:
    import onnxruntime as ort

    a = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"]).run(None, feed)
    b = ort.InferenceSession(optimized.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    return max(float(np.linalg.norm(p - q) / np.linalg.norm(p)) for p, q in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="keep the exported models here")
    parser.add_argument("--tol", type=float, default=1e-3)
    args = parser.parse_args()

    import torch

    import dehm_onnx

    folder = args.out or Path(tempfile.mkdtemp(prefix="dehm_exporters_"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}; models in {folder}\n")
    print("| export | layer | op | weight source | compressed | max rel. output error | inlined functions |")
    print("|---|---|---|---|---|---|---|")
    for i, (label, module, x, options) in enumerate(_models()):
        path = folder / f"model{i}.onnx"
        try:
            _export(module, x, path, options)
        except Exception as e:  # noqa: BLE001 - an exporter that fails is a row, not a stop
            print(f"| {label} | export failed: {type(e).__name__}: {str(e).splitlines()[0][:80]} | | | | | |")
            continue
        optimized, report = dehm_onnx.optimize(path, tol=args.tol, min_size=8, no_verify=True)
        error = _max_rel_error(path, optimized, {"x": x.numpy()})
        inlined = ", ".join(report.inlined_functions) or "-"
        for record in report.layers:
            status = "yes" if record.compressed else f"no: {record.reason}"
            print(f"| {label} | {record.name} | {record.op} | {record.source} | {status} | {error:.1e} | {inlined} |")
        if not report.layers:
            print(f"| {label} | (no MatMul/Gemm with a constant weight) | | | | {error:.1e} | {inlined} |")


if __name__ == "__main__":
    main()
