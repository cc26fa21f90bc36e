"""Weight sources: every chain from stored tensor to MatMul/Gemm weight is compressed within the bound.

Each model is built by hand in the shape the exporters and quantizers write
(``benchmarks/check_exporters.py`` exports the real ones with torch and prints what each
exporter's weights arrive through). The float weight is read from onnxruntime itself (the chain's output exposed), so the
bound is checked against what the original graph computes, not against our own numpy.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import dehm_onnx
from dehm_onnx.graph.scan import scan
from tests.conftest import error_bound_abs, make_model, run_model, smooth_kernel

M, N = 96, 80


def _quantize(w: np.ndarray, scale: np.ndarray, lo: int, hi: int, zero=0) -> np.ndarray:
    return np.clip(np.round(w / scale) + zero, lo, hi)


def _optimize_and_check(model, weight: str, kind: str, rng, x_shape=(3, M), **options):
    """Optimize; the layer is compressed from ``kind`` and its output error is within the bound."""
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = run_model(model, {"x": x}, outputs=[weight])[0].astype(np.float64)  # the float weight per onnxruntime
    out, report = dehm_onnx.optimize(model, no_verify=True, min_size=8, **options)
    (record,) = [r for r in report.layers if r.weight_graph == "main"][:1]
    assert record.compressed, record.reason
    assert record.source == kind
    onnx.checker.check_model(out, full_check=True)
    before, after = run_model(model, {"x": x})[0], run_model(out, {"x": x})[0]
    error = float(np.linalg.norm(after.astype(np.float64) - before))
    assert error <= error_bound_abs(x, w, record.rel_certified_error)
    return out, report


def _ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_dequantize_int8_per_axis_kernel_matrix(rng):
    w = smooth_kernel(M, N)
    scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    q = _quantize(w, scale, -128, 127).astype(np.int8)
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "scale", "zero"], ["w"], axis=1),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="fc"),
    ]
    model = make_model(nodes, [("x", np.float32, [3, M])], [("y", np.float32, [3, N])],
                       [("wq", q), ("scale", scale), ("zero", np.zeros(N, np.int8))])
    out, _ = _optimize_and_check(model, "w", "dequantize int8 per-axis", rng)
    assert "DequantizeLinear" not in _ops(out)
    assert {t.name for t in out.graph.initializer}.isdisjoint({"wq", "scale", "zero"})


def test_dequantize_uint8_per_tensor_with_zero_point(rng):
    w = smooth_kernel(M, N)
    scale = np.float32(np.abs(w).max() / 100)
    q = _quantize(w, scale, 0, 255, zero=128).astype(np.uint8)
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "scale", "zero"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="fc"),
    ]
    model = make_model(nodes, [("x", np.float32, [3, M])], [("y", np.float32, [3, N])],
                       [("wq", q), ("scale", np.array(scale)), ("zero", np.array(128, np.uint8))])
    # Per-tensor 8-bit noise is about 3e-3 of the weight: a tighter tol would have to keep it.
    _optimize_and_check(model, "w", "dequantize uint8 per-tensor", rng, tol=5e-2)


@pytest.mark.parametrize("data_type, lo, hi", [(TensorProto.INT4, -8, 7), (TensorProto.UINT4, 0, 15)])
def test_dequantize_4bit_blocked(rng, data_type, lo, hi):
    block = 32
    w = smooth_kernel(M, N)  # blocks of 32 rows along axis 0, one scale per block and column
    scale = (np.abs(w).reshape(M // block, block, N).max(axis=1) / max(-lo, hi)).astype(np.float32)
    zero = 0 if lo < 0 else 8
    q = _quantize(w, np.repeat(scale, block, axis=0), lo, hi, zero=zero).astype(np.int64)
    inits = [
        helper.make_tensor("wq", data_type, [M, N], q.flatten().tolist()),
        numpy_helper.from_array(scale, "scale"),
        helper.make_tensor("zero", data_type, list(scale.shape), [zero] * scale.size),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "scale", "zero"], ["w"], axis=0, block_size=block),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, M])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    name = "int4" if lo < 0 else "uint4"
    # 4-bit noise is a few percent of the weight; the H-matrix is certified against the noisy
    # float weight, so only a tol above that noise leaves structure to exploit.
    _optimize_and_check(model, "w", f"dequantize {name} blocked", rng, tol=0.2)


def test_cast_of_int8_times_scale(rng):
    w = smooth_kernel(M, N)
    scale = np.float32(np.abs(w).max() / 127)
    q = _quantize(w, scale, -128, 127).astype(np.int8)
    nodes = [
        helper.make_node("Cast", ["wq"], ["wf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["wf", "scale"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="fc"),
    ]
    model = make_model(nodes, [("x", np.float32, [3, M])], [("y", np.float32, [3, N])],
                       [("wq", q), ("scale", np.array(scale))])
    out, _ = _optimize_and_check(model, "w", "scale(cast(initializer int8))", rng)
    assert _ops(out).count("Cast") == 0 and "Mul" not in _ops(out)


def test_cast_of_float16_initializer(rng):
    w = smooth_kernel(M, N).astype(np.float16)
    nodes = [
        helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="fc"),
    ]
    model = make_model(nodes, [("x", np.float32, [3, M])], [("y", np.float32, [3, N])], [("w16", w)])
    _optimize_and_check(model, "w", "cast(initializer float16)", rng)


def test_reshape_of_initializer_to_2d(rng):
    w = smooth_kernel(M, N).reshape(M, 2, N // 2)
    nodes = [
        helper.make_node("Reshape", ["w3", "shape"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="fc"),
    ]
    model = make_model(nodes, [("x", np.float32, [3, M])], [("y", np.float32, [3, N])],
                       [("w3", w), ("shape", np.array([0, -1], np.int64))])
    _optimize_and_check(model, "w", "reshape(initializer)", rng)


def test_transpose_of_initializer_on_3d_input(rng):
    # dynamo with optimize=False: nn.Linear on a 3-D input reads Transpose(weight).
    w_param = np.ascontiguousarray(smooth_kernel(M, N).T)  # torch layout (out, in)
    nodes = [
        helper.make_node("Transpose", ["weight"], ["w"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="fc"),
    ]
    model = make_model(nodes, [("x", np.float32, [2, 3, M])], [("y", np.float32, [2, 3, N])], [("weight", w_param)])
    out, _ = _optimize_and_check(model, "w", "transpose(initializer)", rng, x_shape=(2, 3, M))
    assert "Transpose" not in _ops(out) and "weight" not in {t.name for t in out.graph.initializer}


def test_gemm_trans_b_on_cast_reshape_transpose_composition(rng):
    w = smooth_kernel(M, N)
    stored = np.ascontiguousarray(w).astype(np.float16).reshape(-1)  # flat, half, (in, out)
    nodes = [
        helper.make_node("Cast", ["flat16"], ["flat"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["flat", "shape"], ["w_in_out"]),
        helper.make_node("Transpose", ["w_in_out"], ["b"]),
        helper.make_node("Gemm", ["x", "b"], ["y"], name="fc", transB=1),
    ]
    model = make_model(nodes, [("x", np.float32, [3, M])], [("y", np.float32, [3, N])],
                       [("flat16", stored), ("shape", np.array([M, N], np.int64))])
    out, _ = _optimize_and_check(model, "w_in_out", "transpose(reshape(cast(initializer float16)))", rng)
    assert _ops(out).count("Cast") == 0 and "Reshape" not in _ops(out)


def test_identity_tied_weight_compressed_once_for_both_users(rng):
    # The legacy exporter writes a tied weight's second use as Identity(weight).
    w = smooth_kernel(M, M)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="first"),
        helper.make_node("Identity", ["w"], ["w_tied"]),
        helper.make_node("MatMul", ["h", "w_tied"], ["y"], name="second"),
    ]
    model = make_model(nodes, [("x", np.float32, [3, M])], [("y", np.float32, [3, M])], [("w", w / M)])
    x = rng.standard_normal((3, M)).astype(np.float32)
    out, report = dehm_onnx.optimize(model, no_verify=True, min_size=8)
    assert [(r.name, r.compressed, r.source) for r in report.layers] == [
        ("first", True, "initializer"), ("second", True, "identity(initializer)")
    ]
    assert "Identity" not in _ops(out) and "w" not in {t.name for t in out.graph.initializer}
    floats = [t for t in out.graph.initializer if t.data_type == TensorProto.FLOAT]
    assert len(floats) == 1  # one packed data array serves both layers
    assert report.params_after < report.params_before
    rel = np.linalg.norm(run_model(out, {"x": x})[0] - run_model(model, {"x": x})[0]) / np.linalg.norm(run_model(model, {"x": x})[0])
    assert rel < 1e-2


def test_chain_value_read_by_another_node_keeps_the_weight_dense(rng):
    w = smooth_kernel(M, N).astype(np.float16)
    nodes = [
        helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="fc"),
        helper.make_node("ReduceSum", ["w"], ["s"], keepdims=0),
    ]
    model = make_model(nodes, [("x", np.float32, [3, M])], [("y", np.float32, [3, N]), ("s", np.float32, [])], [("w16", w)])
    out, report = dehm_onnx.optimize(model, no_verify=True, min_size=8)
    (record,) = report.layers
    assert not record.compressed and record.skip_reason == "SHARED_WEIGHT" and "ReduceSum" in record.reason
    assert out.SerializeToString() == model.SerializeToString()


def test_dequantized_model_is_idempotent(rng):
    w = smooth_kernel(M, N)
    scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "scale"], ["w"], axis=1),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="fc"),
    ]
    model = make_model(nodes, [("x", np.float32, [3, M])], [("y", np.float32, [3, N])],
                       [("wq", _quantize(w, scale, -128, 127).astype(np.int8)), ("scale", scale)])
    once, _ = dehm_onnx.optimize(model, no_verify=True, min_size=8)
    twice, report = dehm_onnx.optimize(once, no_verify=True, min_size=8)
    assert report.compressed == [] and twice.SerializeToString() == once.SerializeToString()


def _function_model(w: np.ndarray) -> onnx.ModelProto:
    """The legacy exporter's export_modules_as_functions=True: Gemm inside a local function
    that receives the weight as an argument."""
    body = [helper.make_node("Gemm", ["input", "weight", "bias"], ["output"], transB=1)]
    linear = helper.make_function("pkg.torch", "Linear", ["input", "weight", "bias"], ["output"], body,
                                  opset_imports=[helper.make_opsetid("", 17)])
    nodes = [helper.make_node("Linear", ["x", "fc.weight", "fc.bias"], ["y"], name="fc", domain="pkg.torch")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, M])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, N])],
                              [numpy_helper.from_array(np.ascontiguousarray(w.T), "fc.weight"),
                               numpy_helper.from_array(np.zeros(N, np.float32), "fc.bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("pkg.torch", 1)],
                              functions=[linear], ir_version=10)
    onnx.checker.check_model(model)
    return model


def test_weight_passed_into_a_local_function_is_reached_by_inlining(rng):
    w = smooth_kernel(M, N)
    model = _function_model(w)
    x = rng.standard_normal((3, M)).astype(np.float32)
    out, report = dehm_onnx.optimize(model, no_verify=True, min_size=8)
    assert report.inlined_functions == ["pkg.torch::Linear"]
    assert "inlined model-local functions" in report.to_table()
    (record,) = report.layers
    assert record.compressed and record.source == "initializer" and record.op == "Gemm"
    assert [f.name for f in out.functions if f.domain == "pkg.torch"] == []
    before, after = run_model(model, {"x": x})[0], run_model(out, {"x": x})[0]
    assert np.linalg.norm(after - before) <= error_bound_abs(x, w, record.rel_certified_error)


def test_function_receiving_no_constant_is_left_alone(rng):
    model = _function_model(smooth_kernel(M, N))
    model.graph.input.append(helper.make_tensor_value_info("fc.weight", TensorProto.FLOAT, [N, M]))
    del model.graph.initializer[0]
    out, report = dehm_onnx.optimize(model, no_verify=True, min_size=8)
    assert report.inlined_functions == [] and report.layers == []
    assert out.SerializeToString() == model.SerializeToString()


def test_scan_describes_each_source_without_reading_the_weight():
    w = smooth_kernel(M, N)
    nodes = [
        helper.make_node("Transpose", ["wt"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="fc"),
    ]
    model = make_model(nodes, [("x", np.float32, [3, M])], [("y", np.float32, [3, N])], [("wt", np.ascontiguousarray(w.T))])
    (cand,) = scan(model).candidates
    assert cand.source.kind == "transpose(initializer)" and cand.shape == (M, N) and cand.source.dtype == np.float32
    np.testing.assert_array_equal(cand.weight, w)


def test_reshape_target_built_by_concat_of_constants(rng):
    # dynamo with optimize=False: half parameter .float().reshape(...), the shape a Concat.
    w = smooth_kernel(M, N).astype(np.float16).reshape(M, 2, N // 2)
    nodes = [
        helper.make_node("Cast", ["w16"], ["wf"], to=TensorProto.FLOAT),
        helper.make_node("Constant", [], ["rows"], value_ints=[M]),
        helper.make_node("Constant", [], ["cols"], value_ints=[N]),
        helper.make_node("Concat", ["rows", "cols"], ["shape"], axis=0),
        helper.make_node("Reshape", ["wf", "shape"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="fc"),
    ]
    model = make_model(nodes, [("x", np.float32, [3, M])], [("y", np.float32, [3, N])], [("w16", w)])
    out, _ = _optimize_and_check(model, "w", "reshape(cast(initializer float16))", rng)
    assert _ops(out) == ["HMatMul"]  # the chain and its shape constants are gone


def test_weight_passed_through_nested_local_functions(rng):
    # The legacy exporter nests module functions: Model(x, weight) calls Linear(x, weight).
    w = smooth_kernel(M, N)
    linear = helper.make_function("pkg.nn", "Linear", ["input", "weight"], ["output"],
                                  [helper.make_node("Gemm", ["input", "weight"], ["output"], transB=1)],
                                  opset_imports=[helper.make_opsetid("", 17)])
    outer = helper.make_function("pkg", "Model", ["x", "weight"], ["y"],
                                 [helper.make_node("Linear", ["x", "weight"], ["y"], domain="pkg.nn")],
                                 opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("pkg.nn", 1)])
    graph = helper.make_graph([helper.make_node("Model", ["x", "fc.weight"], ["y"], domain="pkg")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, M])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, N])],
                              [numpy_helper.from_array(np.ascontiguousarray(w.T), "fc.weight")])
    opsets = [helper.make_opsetid(d, v) for d, v in (("", 17), ("pkg", 1), ("pkg.nn", 1))]
    model = helper.make_model(graph, opset_imports=opsets, functions=[outer, linear], ir_version=10)
    onnx.checker.check_model(model)
    x = rng.standard_normal((3, M)).astype(np.float32)
    out, report = dehm_onnx.optimize(model, no_verify=True, min_size=8)
    assert report.inlined_functions == ["pkg::Model", "pkg.nn::Linear"]
    (record,) = report.layers
    assert record.compressed and record.op == "Gemm"
    before, after = run_model(model, {"x": x})[0], run_model(out, {"x": x})[0]
    assert np.linalg.norm(after - before) <= error_bound_abs(x, w, record.rel_certified_error)


def test_inlined_layers_are_verified_against_the_inlined_original(rng):
    model = _function_model(smooth_kernel(M, N))
    out, report = dehm_onnx.optimize(model, min_size=8)
    assert report.inlined_functions == ["pkg.torch::Linear"]
    assert report.verification["performed"]
    (layer,) = report.verification["result"]["layers"]
    assert layer["isolated"] and layer["rel_fro_error"] <= layer["tol_out"]
