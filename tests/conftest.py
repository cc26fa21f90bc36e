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
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
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


def error_bound_abs(x: np.ndarray, w: np.ndarray, rel_weight_error: float, alpha: float = 1.0, dtype=np.float32) -> float:
    """Absolute bound on ``||alpha x W - alpha x W_H||_F`` (computed in ``dtype``), x of shape (..., m)."""
    x64 = np.asarray(x, np.float64).reshape(-1, w.shape[0])
    w64 = np.asarray(w, np.float64)
    eps = np.finfo(dtype).eps
    truncation = np.linalg.norm(x64, 2) * rel_weight_error * np.linalg.norm(w64)
    rounding = 4 * w.shape[0] * eps * np.linalg.norm(np.abs(x64) @ np.abs(w64))
    return float(abs(alpha) * (truncation + rounding))


def _graphs(graph: onnx.GraphProto):
    """``graph`` and its If/Loop/Scan bodies (protos)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from _graphs(sub)


def _constants_by_name(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    found = {}
    for graph in _graphs(model.graph):
        for tensor in graph.initializer:
            found[tensor.name] = tensor
        for node in graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        found[node.output[0]] = attr.t
    return found


def extract_nodes(model: onnx.ModelProto, nodes, output: str, dtype=np.float32) -> onnx.ModelProto:
    """A standalone model of ``nodes`` (from any graph of ``model``) computing ``output``.

    Constants they read (from any scope) become initializers; every other tensor they read
    and do not produce becomes a graph input of unknown shape.
    """
    constants = _constants_by_name(model)
    produced = {o for n in nodes for o in n.output}
    needed = [i for n in nodes for i in n.input if i and i not in produced]
    needed = list(dict.fromkeys(needed))
    inits = [constants[name] for name in needed if name in constants]
    inputs = [
        helper.make_tensor_value_info(name, tensor_type(dtype), None) for name in needed if name not in constants
    ]
    graph = helper.make_graph(list(nodes), "layer", inputs, [helper.make_empty_tensor_value_info(output)], inits)
    sub = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    sub.functions.extend(model.functions)
    return sub


def _layer_nodes(model: onnx.ModelProto, output: str, inputs: set) -> list:
    """The nodes (in graph order) computing ``output`` from the tensors named ``inputs``,
    constants and graph inputs: one compressed layer of an optimized model."""
    for graph in _graphs(model.graph):
        producers = {o: n for n in graph.node for o in n.output}
        if output not in producers:
            continue
        found, stack = set(), [output]
        while stack:
            name = stack.pop()
            if name in inputs or name not in producers or id(producers[name]) in found:
                continue
            found.add(id(producers[name]))
            stack.extend(producers[name].input)
        return [n for n in graph.node if id(n) in found]
    raise AssertionError(f"no node computes {output!r}")


def assert_layers_within_bound(original: onnx.ModelProto, optimized: onnx.ModelProto, report, rng, batch: int = 3):
    """Run every compressed layer of ``optimized`` alone in onnxruntime on random inputs and
    check its error against the certified weight bound (any graph, main or subgraph).

    Returns the measured relative output errors keyed by layer name.
    """
    from dehm_onnx.graph.scan import scan

    cands = {c.output: c for c in scan(original).candidates}
    originals = {n.output[0]: n for g in _graphs(original.graph) for n in g.node if n.output}
    measured = {}
    emitted: dict[str, list] = {}
    for record in report.compressed:
        cand = cands[record.output]
        emitted[record.name] = _layer_nodes(optimized, record.output, {cand.x_name, cand.c_name})
        w = cand.weight
        dtype = w.dtype
        x_eff = rng.standard_normal((batch, w.shape[0])).astype(dtype)
        if any(n.op_type == "Relu" for n in emitted[record.name]):  # the clamp (emissions have no other Relu)
            x_eff = np.abs(x_eff)  # a clamped layer's input is provably nonnegative in its model
        x_feed = x_eff.T if cand.trans_x else x_eff
        feeds = {cand.x_name: np.ascontiguousarray(x_feed)}
        if cand.c_name and cand.c_name not in _constants_by_name(original):
            c_shape = (w.shape[1], batch) if cand.trans_y else (batch, w.shape[1])
            feeds[cand.c_name] = rng.standard_normal(c_shape).astype(dtype)
        before = run_model(extract_nodes(original, [originals[record.output]], record.output, dtype), feeds)[0]
        after = run_model(extract_nodes(optimized, emitted[record.name], record.output, dtype), feeds)[0]
        bound = error_bound_abs(x_eff, w, record.rel_certified_error, cand.alpha, dtype)
        error = float(np.linalg.norm(after.astype(np.float64) - before.astype(np.float64)))
        assert error <= bound, f"layer {record.name!r}: error {error:.3e} > bound {bound:.3e}"
        measured[record.name] = error / float(np.linalg.norm(before.astype(np.float64)))
    return measured
