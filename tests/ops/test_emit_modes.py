"""The conformance table through every emit mode, and an optimized model on both runtimes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hmatmul_cases import CASES, expected, tolerance
from onnx import TensorProto, helper, numpy_helper
from test_hmatmul_cases import assert_matches

import dehm_onnx
from dehm_onnx.graph.emit import EmitContext
from dehm_onnx.graph.emit import layer_model as emitted_layer
from dehm_onnx.report import read_layers
from dehm_onnx.ops import hmatmul
from dehm_onnx.ops.library import make_session

# (emit mode, runs with the library registered)
RUNS = [("ops", False), ("function", False), ("function", True), ("custom", True)]
# The standard-op families forced, with integer arrays fused or folded, at opset 21 (int4
# tensors, blocked DequantizeLinear) and 17 (int4 written as int8, per-column scales only).
FAMILIES = [
    ("batched", False, 21), ("batched", False, 17),
    ("blocks", False, 21), ("blocks", True, 21), ("blocks", True, 17),
]


def layer_model(case, mode: str, opset: int = 17, context: EmitContext | None = None) -> onnx.ModelProto:
    """A one-layer model ``Y = X @ W_H`` from the emitter, spliced as the rewrite would."""
    lead = [f"d{i}" for i in range(case.x.ndim - 1)]
    model = emitted_layer(case.hm, mode, [*lead, case.hm.shape[0]], case.x.dtype, "layer.w.hm", opset, context)
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model, feeds, library: bool, exact_int: bool = False):
    if library:
        return make_session(model).run(None, feeds)
    options = ort.SessionOptions()
    if exact_int:
        # MatMulNBits' accuracy level 0: float activations (the default level 4 quantizes
        # them to 8 bits, about 5e-3 relative error; tested in tests/graph/test_quantized.py).
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("mode,library", RUNS, ids=[f"{m}-{'library' if lib else 'stock'}" for m, lib in RUNS])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_emit_mode_matches_dense_product(case, mode, library):
    assert_matches(case, run(layer_model(case, mode), {"X": case.x}, library)[0])


@pytest.mark.parametrize("family,fuse,opset", FAMILIES, ids=[f"{f}-{'fused' if u else 'folded'}-{o}" for f, u, o in FAMILIES])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_standard_op_family_matches_dense_product(case, family, fuse, opset):
    context = EmitContext(x_rank=case.x.ndim, opset=opset, fuse_int=fuse, family=family)
    model = layer_model(case, "ops", opset, context)
    assert_matches(case, run(model, {"X": case.x}, False, exact_int=fuse)[0])


def test_function_mode_stores_weights_once():
    case = next(c for c in CASES if c.name == "hodlr_permuted_3d")
    model = layer_model(case, "function")
    floats = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT]
    assert [t.name for t in floats] == ["layer.w.hm.data"]
    assert numpy_helper.to_array(floats[0]).size == case.hm.params
    body_values = sum(np.asarray(numpy_helper.to_array(a.t)).size for n in model.functions[0].node
                      for a in n.attribute if a.name == "value" and a.t.data_type == TensorProto.FLOAT)
    assert body_values == 0, "the function body must slice the factors out of data, not copy them"


def test_library_runs_the_kernel_not_the_body():
    """Negate the body's result: stock onnxruntime then returns -Y, the library still Y."""
    case = next(c for c in CASES if c.name == "mixed_permuted")
    model = layer_model(case, "function")
    body = model.functions[0]
    for node in body.node:
        for i, name in enumerate(node.output):
            if name == "Y":
                node.output[i] = "Y_body"
    body.node.append(helper.make_node("Neg", ["Y_body"], ["Y"]))
    exp = expected(case)
    np.testing.assert_allclose(run(model, {"X": case.x}, False)[0], -exp, atol=float(tolerance(case).max()))
    np.testing.assert_allclose(run(model, {"X": case.x}, True)[0], exp, atol=float(tolerance(case).max()))


def _two_layer_model() -> tuple[onnx.ModelProto, dict]:
    rng = np.random.default_rng(0)
    s, t = np.linspace(0.0, 1.0, 96)[:, None], np.linspace(0.0, 1.0, 80)[None, :]
    weights = {
        "W1": np.exp(-4.0 * np.abs(s - t)).astype(np.float32),
        "W2": (rng.standard_normal((64, 3)) @ rng.standard_normal((3, 80))).astype(np.float32),  # transB=1
        "b": rng.standard_normal(64).astype(np.float32),
    }
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Gemm", ["r", "W2", "b"], ["Y"], name="fc2", transB=1)],
        "mlp", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 96])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 64])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), weights


def test_optimized_function_model_same_outputs_stock_and_library(tmp_path):
    model, w = _two_layer_model()
    optimized, _ = dehm_onnx.optimize(model, emit="function", tol=1e-3)
    path = tmp_path / "opt.onnx"
    onnx.save(optimized, path)
    loaded = onnx.load(path)
    onnx.checker.check_model(loaded)
    assert [n.op_type for n in loaded.graph.node if n.domain == hmatmul.DOMAIN] == ["HMatMul", "HMatMul"]
    bodies = [f.overload for f in loaded.functions if f.name == "HMatMul"]
    decoders = [f for f in loaded.functions if f.name != "HMatMul"]  # layout v2 layers' (precision auto)
    assert len(set(bodies)) == 2 and all(bodies) and loaded.ir_version >= 10  # one overload per layer
    assert all(f.name.startswith("Decode") and not f.overload for f in decoders)

    x = np.random.default_rng(1).standard_normal((5, 96)).astype(np.float32)
    stock = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
    library = make_session(path).run(None, {"X": x})[0]
    original = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]

    # Bound from the certified weight errors: with E_i = ||W_i - W_H,i||_F and Relu 1-Lipschitz,
    # ||Y - Y_H||_F <= ||X||_2 E_1 (||W_2||_2 + E_2) + ||relu(X W_1)||_2 E_2.
    layers = {layer["weight"]: layer for layer in read_layers(loaded)}
    e1 = layers["W1"]["rel_certified_error"] * np.linalg.norm(w["W1"])
    e2 = layers["W2"]["rel_certified_error"] * np.linalg.norm(w["W2"])
    hidden = np.maximum(x @ w["W1"], 0.0)
    bound = np.linalg.norm(x, 2) * e1 * (np.linalg.norm(w["W2"], 2) + e2) + np.linalg.norm(hidden, 2) * e2
    rounding = 1e-5 * np.linalg.norm(original)  # float32 evaluation of either model
    assert np.linalg.norm(stock - original) <= bound + rounding
    assert np.linalg.norm(library - original) <= bound + rounding
    np.testing.assert_allclose(library, stock, rtol=1e-4, atol=1e-4 * np.abs(stock).max())


@pytest.mark.parametrize("precision", ["float", "auto"])
def test_optimized_custom_model_matches_function_model_with_library(precision):
    model, _ = _two_layer_model()
    # the same precision: both write the same packed layout (v1 for float storage, else v2)
    custom, _ = dehm_onnx.optimize(model, emit="custom", tol=1e-3, precision=precision)
    function, _ = dehm_onnx.optimize(model, emit="function", tol=1e-3, precision=precision)
    assert not custom.functions and all(n.overload == "" for n in custom.graph.node)
    x = np.random.default_rng(2).standard_normal((3, 96)).astype(np.float32)
    y_custom = make_session(custom).run(None, {"X": x})[0]
    y_function = make_session(function).run(None, {"X": x})[0]
    np.testing.assert_array_equal(y_custom, y_function)  # same kernel, same packed data
    with pytest.raises(Exception, match="HMatMul"):  # stock onnxruntime has no kernel for it
        ort.InferenceSession(custom.SerializeToString(), providers=["CPUExecutionProvider"])
