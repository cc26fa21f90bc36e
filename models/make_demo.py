"""Generate ``models/demo.onnx``: a small MLP whose layers look like operators found in models.

Layers (``x`` of shape ``(batch, 256)``):

1. ``smooth``: ``MatMul`` by a logarithmic kernel ``K[i, j] = log(|s_i - s_j| + 1/n) / n``
   between sorted points in [0, 1] (a discretized integral operator, as in boundary-element
   methods: full rank overall, numerically low rank away from the diagonal).
2. ``mel``: ``MatMul`` by a banded triangular filterbank on a mel-like scale, 256 bins to 80
   filters (as in audio front ends: most of the matrix is exactly zero).
3. ``dense``: ``Gemm`` with a Gaussian random weight (``transB=1``) and a bias; nothing to
   exploit, so the optimizer must leave it dense.

Run: ``python models/make_demo.py [OUT]`` (default ``models/demo.onnx``). Deterministic.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IN_FEATURES, MELS, OUT_FEATURES = 256, 80, 64


def log_kernel(n: int) -> np.ndarray:
    points = np.linspace(0.0, 1.0, n)
    return np.log(np.abs(points[:, None] - points[None, :]) + 1.0 / n) / n


def mel_filterbank(bins: int, filters: int) -> np.ndarray:
    """Triangular filters with centres evenly spaced on ``mel(f) = 2595 log10(1 + f / 700)``."""
    freqs = np.linspace(0.0, 8000.0, bins)
    mel = 2595.0 * np.log10(1.0 + freqs / 700.0)
    edges = np.linspace(mel[0], mel[-1], filters + 2)
    bank = np.zeros((bins, filters))
    for k in range(filters):
        lo, centre, hi = edges[k], edges[k + 1], edges[k + 2]
        rising = (mel - lo) / (centre - lo)
        falling = (hi - mel) / (hi - centre)
        bank[:, k] = np.clip(np.minimum(rising, falling), 0.0, None)
    return bank


def build() -> onnx.ModelProto:
    """The demo model (checked by ``onnx.checker``)."""
    rng = np.random.default_rng(0)
    weights = {
        "smooth.weight": log_kernel(IN_FEATURES),
        "mel.weight": mel_filterbank(IN_FEATURES, MELS),
        "dense.weight": rng.standard_normal((OUT_FEATURES, MELS)) / np.sqrt(MELS),
        "dense.bias": rng.standard_normal(OUT_FEATURES) * 0.1,
    }
    nodes = [
        helper.make_node("MatMul", ["x", "smooth.weight"], ["smooth.out"], name="smooth"),
        helper.make_node("Abs", ["smooth.out"], ["power"], name="power"),
        helper.make_node("MatMul", ["power", "mel.weight"], ["mel.out"], name="mel"),
        helper.make_node("Gemm", ["mel.out", "dense.weight", "dense.bias"], ["y"], name="dense", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "dehm_demo",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", IN_FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", OUT_FEATURES])],
        [numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="dehm_onnx demo",
                              ir_version=8)  # loads on onnxruntime releases older than this onnx package
    onnx.checker.check_model(model)
    return model


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).with_name("demo.onnx")
    onnx.save(build(), out)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
