"""Small ONNX models and hand-made "optimized" counterparts for the verify tests.

The optimized models are written by hand (a weight replaced by its truncated SVD, emitted as
``(X @ U) @ Vt`` ending in the original output name, plus ``dehm.layers`` metadata), so these
tests do not depend on the optimize pass.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import helper, numpy_helper


def graded_matrix(rng, m: int, n: int, decay: float = 0.7) -> np.ndarray:
    """An m x n matrix with geometrically decaying singular values (known spectrum)."""
    k = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return (u * decay ** np.arange(k)) @ v.T


def truncate(w: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Best low-rank factors U, Vt with ||W - U Vt||_F <= tol ||W||_F; returns the relative error."""
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    tail = np.sqrt(np.cumsum((s**2)[::-1])[::-1])
    k = int(np.argmax(np.append(tail, 0.0) <= tol * np.linalg.norm(w)))
    uk, vk = (u[:, :k] * s[:k]).astype(w.dtype), vt[:k].astype(w.dtype)
    err = float(np.linalg.norm(w - uk @ vk) / np.linalg.norm(w))
    return uk, vk, err


def mlp(weights: list, dtype=np.float32, batch="N") -> onnx.ModelProto:
    """x -> MatMul W0 -> Relu -> MatMul W1 -> ... -> y; layer i is node 'fc{i}' with output 'h{i}'."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes, inits, x = [], [], "x"
    for i, w in enumerate(weights):
        inits.append(numpy_helper.from_array(w.astype(dtype), f"W{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"W{i}"], [f"h{i}"], name=f"fc{i}"))
        x = f"h{i}"
        if i < len(weights) - 1:
            nodes.append(helper.make_node("Relu", [x], [f"a{i}"], name=f"relu{i}"))
            x = f"a{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", elem, [batch, weights[0].shape[0]])],
        [helper.make_tensor_value_info("y", elem, [batch, weights[-1].shape[1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    return model


def lowrank_optimized(model: onnx.ModelProto, tols: dict, tol_out: dict | None = None) -> onnx.ModelProto:
    """Replace the MatMul weights named in ``tols`` ({node name: tol}) by truncated SVD factors."""
    opt = onnx.ModelProto()
    opt.CopyFrom(model)
    graph = opt.graph
    inits = {t.name: t for t in graph.initializer}
    layers, new_nodes = [], []
    for node in graph.node:
        if node.name not in tols:
            new_nodes.append(node)
            continue
        x, wname = node.input
        w = numpy_helper.to_array(inits[wname])
        u, vt, err = truncate(w.astype(np.float64), tols[node.name])
        u, vt = u.astype(w.dtype), vt.astype(w.dtype)
        graph.initializer.remove(inits[wname])
        graph.initializer.extend([numpy_helper.from_array(u, f"{wname}.u"), numpy_helper.from_array(vt, f"{wname}.vt")])
        new_nodes.append(helper.make_node("MatMul", [x, f"{wname}.u"], [f"{node.output[0]}.t"], name=f"{node.name}.a"))
        new_nodes.append(helper.make_node("MatMul", [f"{node.output[0]}.t", f"{wname}.vt"], [node.output[0]], name=f"{node.name}.b"))
        layers.append({
            "name": node.name, "op": "MatMul", "output": node.output[0], "weight": wname, "x": x, "x_transposed": False,
            "shape": list(w.shape), "tol": tols[node.name],
            "tol_out": (tol_out or {}).get(node.name, tols[node.name]),
            "rel_certified_error": err, "params": int(u.size + vt.size), "dense_params": int(w.size),
            "emit": "ops",
        })
    del graph.node[:]
    graph.node.extend(new_nodes)
    helper.set_model_props(opt, {"dehm.layers": json.dumps(layers), "dehm.version": "0.1.0"})
    return opt


def scale_initializer(model: onnx.ModelProto, name: str, factor: float) -> onnx.ModelProto:
    """A copy of ``model`` with initializer ``name`` multiplied by ``factor`` (tampering)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.asarray(factor, numpy_helper.to_array(t).dtype), name))
    return out


def tiered_matrix(rng, m: int, n: int, tiers) -> tuple[np.ndarray, np.ndarray]:
    """W = U diag(s) V^T with ``tiers`` = [(count, sigma), ...]; returns (W, U) (U: m x k)."""
    s = np.concatenate([np.full(count, sigma) for count, sigma in tiers])
    k = len(s)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return (u * s) @ v.T, u


def gp_model(n: int = 200, length: float = 0.3, noise: float = 1e-3, seed: int = 0) -> onnx.ModelProto:
    """A Gaussian-process regressor as skl2onnx writes one (float64): mean and posterior std.

    Training points ``xt`` uniform in [0, 10], RBF kernel; ``std = sqrt(max(1 - k_x K^-1 k_x^T, 0))``
    is a difference of nearly equal terms, so a tiny relative error of ``K^-1`` (an n x n
    MatMul weight, layer ``kinv_product``) moves it a lot.
    """
    rng = np.random.default_rng(seed)
    xt = np.sort(rng.uniform(0, 10, n))
    yt = np.sin(xt) + 0.1 * rng.standard_normal(n)
    k = np.exp(-((xt[:, None] - xt[None, :]) ** 2) / (2 * length**2)) + noise * np.eye(n)
    kinv = np.linalg.inv(k)
    inits = {"xt": xt[None, :], "scale": np.array(-0.5 / length**2), "kinv": kinv, "alpha": (kinv @ yt)[:, None],
             "one": np.array(1.0), "zero": np.array(0.0), "axes": np.array([1], np.int64)}
    nodes = [
        helper.make_node("Sub", ["x", "xt"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["d2"]),
        helper.make_node("Mul", ["d2", "scale"], ["e"]),
        helper.make_node("Exp", ["e"], ["kx"]),
        helper.make_node("MatMul", ["kx", "alpha"], ["mean"], name="mean"),
        helper.make_node("MatMul", ["kx", "kinv"], ["t"], name="kinv_product"),
        helper.make_node("Mul", ["t", "kx"], ["tk"]),
        helper.make_node("ReduceSum", ["tk", "axes"], ["quad"], keepdims=1),
        helper.make_node("Sub", ["one", "quad"], ["var"]),
        helper.make_node("Max", ["var", "zero"], ["var0"]),
        helper.make_node("Sqrt", ["var0"], ["std"]),
    ]
    double = onnx.TensorProto.DOUBLE
    graph = helper.make_graph(nodes, "gp", [helper.make_tensor_value_info("x", double, ["N", 1])],
                              [helper.make_tensor_value_info("mean", double, ["N", 1]),
                               helper.make_tensor_value_info("std", double, ["N", 1])],
                              [numpy_helper.from_array(np.asarray(v), name) for name, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
