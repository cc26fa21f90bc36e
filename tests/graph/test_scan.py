"""Candidate discovery: constants (initializers, Constant nodes), scopes, orientation."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

import dehm_onnx
from dehm_onnx.graph.scan import activation_ranks, scan
from tests.conftest import low_rank, make_model, rel_fro, run_model


def test_scan_constant_node_weight_in_main_graph(rng):
    w = low_rank(rng, 96, 80)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w")),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
    ]
    model = make_model(nodes, [("x", np.float32, [2, 96])], [("y", np.float32, [2, 80])])
    (cand,) = scan(model).candidates
    assert cand.source.constant_node is not None and cand.source.kind == "constant" and cand.weight.shape == (96, 80)
    model.graph.value_info.append(helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [96, 80]))
    out, report = dehm_onnx.optimize(model)
    assert report.layers[0].compressed and "Constant" not in [n.op_type for n in out.graph.node]
    assert "w" not in {v.name for v in out.graph.value_info}  # no description of a removed tensor
    x = rng.standard_normal((2, 96)).astype(np.float32)
    assert rel_fro(run_model(out, {"x": x})[0], run_model(model, {"x": x})[0]) < 1e-5


def test_scan_orientation_of_every_form(rng):
    w = low_rank(rng, 96, 64)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y1"], name="right"),
        helper.make_node("MatMul", ["w", "z"], ["y2"], name="left"),
        helper.make_node("Gemm", ["xt", "wt"], ["y3"], name="gemm_tb", transB=1),
        helper.make_node("Gemm", ["wt", "z"], ["y4"], name="gemm_a", transA=1),
    ]
    model = make_model(
        nodes,
        [("x", np.float32, [3, 96]), ("z", np.float32, [64, 5]), ("xt", np.float32, [3, 96])],
        [("y1", np.float32, [3, 64]), ("y2", np.float32, [96, 5]), ("y3", np.float32, [3, 64]), ("y4", np.float32, [96, 5])],
        [("w", w), ("wt", np.ascontiguousarray(w.T))],
    )
    cands = {c.name: c for c in scan(model, activation_ranks(model)).candidates}
    assert cands["right"].weight.shape == (96, 64) and not cands["right"].trans_x
    assert cands["left"].weight.shape == (64, 96) and cands["left"].trans_x and cands["left"].trans_y
    np.testing.assert_array_equal(cands["gemm_tb"].weight, w)
    np.testing.assert_array_equal(cands["gemm_a"].weight, w.T)  # op(A) = w, so W = wᵀ
    assert cands["gemm_a"].trans_y and cands["gemm_a"].trans_x


def test_scan_inner_name_shadows_outer_constant(rng):
    w = low_rank(rng, 96, 96)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["x"], ["w"], name="shadow"),  # a local, non-constant 'w'
            helper.make_node("MatMul", ["x", "w"], ["t_out"], name="inner"),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", onnx.TensorProto.FLOAT, [96, 96])],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e_out"])], "else", [], [helper.make_tensor_value_info("e_out", onnx.TensorProto.FLOAT, [96, 96])]
    )
    nodes = [
        helper.make_node("If", ["c"], ["y"], name="if", then_branch=body, else_branch=other),
        helper.make_node("MatMul", ["x", "w_outer"], ["y2"], name="outer"),
    ]
    model = make_model(
        nodes,
        [("c", np.bool_, []), ("x", np.float32, [96, 96])],
        [("y", np.float32, [96, 96]), ("y2", np.float32, [96, 96])],
        [("w_outer", w)],
    )
    assert [c.name for c in scan(model).candidates] == ["outer"]


def test_scan_loop_body_reads_outer_initializer(rng):
    w = low_rank(rng, 64, 64)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "w"], ["h_out"], name="step"), helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", onnx.TensorProto.FLOAT, [2, 64]),
        ],
        [helper.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []), helper.make_tensor_value_info("h_out", onnx.TensorProto.FLOAT, [2, 64])],
    )
    node = helper.make_node("Loop", ["trips", "", "h0"], ["h"], name="loop", body=body)
    model = make_model([node], [("trips", np.int64, []), ("h0", np.float32, [2, 64])], [("h", np.float32, [2, 64])], [("w", w / 8)])
    out, report = dehm_onnx.optimize(model)
    (record,) = report.layers
    assert record.compressed and record.graph == "main/loop.body"
    onnx.checker.check_model(out, full_check=True)
    feeds = {"trips": np.array(3, dtype=np.int64), "h0": rng.standard_normal((2, 64)).astype(np.float32)}
    assert rel_fro(run_model(out, feeds)[0], run_model(model, feeds)[0]) < 1e-5


def test_scan_body_reads_outer_initializer(rng):
    w = low_rank(rng, 96, 64)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_t", "w"], ["y_t"], name="step")],
        "body",
        [helper.make_tensor_value_info("x_t", onnx.TensorProto.FLOAT, [96])],
        [helper.make_tensor_value_info("y_t", onnx.TensorProto.FLOAT, [64])],
    )
    node = helper.make_node("Scan", ["x"], ["y"], name="scan", body=body, num_scan_inputs=1)
    model = make_model([node], [("x", np.float32, [5, 96])], [("y", np.float32, [5, 64])], [("w", w)])
    out, report = dehm_onnx.optimize(model)
    (record,) = report.layers
    assert record.compressed and record.graph == "main/scan.body" and record.weight_graph == "main"
    onnx.checker.check_model(out, full_check=True)
    x = rng.standard_normal((5, 96)).astype(np.float32)
    assert rel_fro(run_model(out, {"x": x})[0], run_model(model, {"x": x})[0]) < 1e-5
