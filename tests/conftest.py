"""Shared fixtures: seeded rng, weights of known structure, tiny ONNX model builders."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def low_rank(rng, m: int, n: int, rank: int = 4, dtype=np.float32) -> np.ndarray:
    """An exactly rank-``rank`` matrix (compresses with error at machine precision)."""
    return (rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n)) / np.sqrt(rank)).astype(dtype)


def smooth_kernel(m: int, n: int, dtype=np.float32) -> np.ndarray:
    """A Gaussian kernel between sorted points: numerically low rank, compresses well."""
    x = np.linspace(0.0, 1.0, m)[:, None]
    y = np.linspace(0.0, 1.0, n)[None, :]
    return np.exp(-(((x - y) / 0.5) ** 2)).astype(dtype)


def tensor_type(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def make_model(nodes, inputs, outputs, initializers=(), opset=OPSET) -> onnx.ModelProto:
    """A checked model from nodes and ``(name, dtype, shape)`` inputs/outputs."""
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info(n, tensor_type(d), s) for n, d, s in inputs],
        [helper.make_tensor_value_info(n, tensor_type(d), s) for n, d, s in outputs],
        [numpy_helper.from_array(np.ascontiguousarray(a), name) for name, a in initializers],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def run_model(model: onnx.ModelProto, feeds: dict, outputs=None) -> list[np.ndarray]:
    """Run ``model`` in onnxruntime (CPU); optionally expose intermediate ``outputs``."""
    if outputs:
        model = expose(model, outputs)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(outputs, feeds)


def expose(model: onnx.ModelProto, names) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs the tensors ``names`` (main graph)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    have = {o.name for o in copy.graph.output}
    for name in names:
        if name not in have:
            copy.graph.output.append(helper.make_empty_tensor_value_info(name))
    return copy


def rel_fro(a: np.ndarray, b: np.ndarray) -> float:
    """``||a - b||_F / ||b||_F`` in float64."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a64 - b64) / np.linalg.norm(b64))


def output_bound(x: np.ndarray, w: np.ndarray, rel_weight_error: float, dtype=np.float32) -> float:
    """Bound on ``||x (W - W_H)||_F / ||x W||_F`` from the certified weight error, plus rounding.

    ``||x (W - W_H)||_F <= ||x||_2 ||W - W_H||_F``; the rounding term allows for computing
    both products in ``dtype`` with sums of length ``m``.
    """
    x64 = np.asarray(x, np.float64).reshape(-1, w.shape[0])
    w64 = np.asarray(w, np.float64)
    exact = np.linalg.norm(x64 @ w64)
    spectral = np.linalg.norm(x64, 2)
    rounding = 4 * w.shape[0] * np.finfo(dtype).eps * np.linalg.norm(np.abs(x64) @ np.abs(w64))
    return float((spectral * rel_weight_error * np.linalg.norm(w64) + rounding) / exact)
