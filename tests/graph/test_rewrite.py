"""The optimize pass on small models built here: wiring, bounds, sharing, subgraphs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import dehm_onnx
from dehm_onnx.config import OptimizeConfig
from dehm_onnx.report import LAYERS_KEY, read_layers
from dehm_onnx.graph.scan import is_emitted
from dehm_onnx.report import METADATA_KEYS
from tests.conftest import low_rank, make_model, output_bound, rel_fro, run_model, smooth_kernel


def optimize(model, *args, **options):
    """``dehm_onnx.optimize`` with the factors in the weight's dtype (``precision="float"``):
    these tests check the wiring at rounding level, which integer or float16 storage would hide."""
    return dehm_onnx.optimize(model, *args, **{"precision": "float", **options})

# Exactly low-rank weights compress with rounding error only: wiring errors show up far above.
WIRING_RTOL = 1e-5


def _mlp(rng, m=128, h=96, n=80):
    w1 = low_rank(rng, m, h)
    w2 = low_rank(rng, h, n)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
    ]
    return make_model(nodes, [("x", np.float32, ["B", m])], [("y", np.float32, ["B", n])], [("w1", w1), ("w2", w2)])


def test_rewrite_mlp_matches_original_and_keeps_interface(rng):
    model = _mlp(rng)
    out, report = optimize(model)
    onnx.checker.check_model(out, full_check=True)
    assert [r.compressed for r in report.layers] == [True, True]
    assert [i.name for i in out.graph.input] == ["x"] and [o.name for o in out.graph.output] == ["y"]
    assert {t.name for t in out.graph.initializer}.isdisjoint({"w1", "w2"})
    assert [n.name for n in out.graph.node if not is_emitted(n)] == ["relu"]
    x = rng.standard_normal((5, 128)).astype(np.float32)
    (y0, h0), (y1, h1) = run_model(model, {"x": x}, ["y", "h"]), run_model(out, {"x": x}, ["y", "h"])
    assert rel_fro(h1, h0) < WIRING_RTOL and rel_fro(y1, y0) < WIRING_RTOL


def test_rewrite_does_not_modify_input_model(rng):
    model = _mlp(rng)
    before = model.SerializeToString()
    optimize(model)
    assert model.SerializeToString() == before


def test_rewrite_writes_layer_metadata_contract(rng):
    out, report = optimize(_mlp(rng))
    props = {p.key: p.value for p in out.metadata_props}
    assert props["dehm.version"] == dehm_onnx.__version__
    layers = json.loads(props[LAYERS_KEY])
    assert [entry["name"] for entry in layers] == ["fc1", "fc2"]
    for entry in layers:
        assert tuple(entry) == METADATA_KEYS
        # the default mode (auto) writes standard ops for these layers
        assert entry["op"] == "MatMul" and entry["emit"] == "ops" and OptimizeConfig().emit == "auto"
        assert entry["tol_out"] == entry["tol"] == 1e-3
        assert 0 <= entry["rel_certified_error"] <= entry["tol"]
        assert entry["params"] < entry["dense_params"]
    assert layers[0]["shape"] == [128, 96] and layers[0]["output"] == "h" and layers[0]["weight"] == "w1"
    provenance = [n for n in out.graph.node if is_emitted(n)]
    assert provenance and all("dehm.source_node" in {p.key for p in n.metadata_props} for n in provenance)
    bounds = [n for n in provenance if {"dehm.tol", "dehm.rel_certified_error"} <= {p.key for p in n.metadata_props}]
    assert sorted(n.output[0] for n in bounds) == ["h", "y"]  # each layer's last node


def test_rewrite_is_idempotent(rng):
    out, _ = optimize(_mlp(rng))
    again, report = optimize(out)
    assert again.SerializeToString() == out.SerializeToString()
    assert report.compressed == []


def test_rewrite_layer_error_within_certified_bound(rng):
    m, n = 256, 192
    w = smooth_kernel(m, n)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="kernel")],
        [("x", np.float32, ["B", m])],
        [("y", np.float32, ["B", n])],
        [("w", w)],
    )
    out, report = optimize(model, tol=1e-2)
    (record,) = report.layers
    assert record.compressed and record.params < record.dense_params
    assert record.rel_certified_error <= 1e-2
    x = rng.standard_normal((16, m)).astype(np.float32)
    measured = rel_fro(run_model(out, {"x": x})[0], x.astype(np.float64) @ w.astype(np.float64))
    assert measured <= output_bound(x, w, record.rel_certified_error)


def _gemm_model(rng, trans_a, trans_b, alpha, beta, bias, const_side):
    k, m, n = 96, 7, 80  # op(A): (m, k); op(B): (k, n)
    w = low_rank(rng, *((n, k) if trans_b else (k, n))) if const_side == "B" else low_rank(rng, *((k, m) if trans_a else (m, k)))
    a_shape = [k, m] if trans_a else [m, k]
    b_shape = [n, k] if trans_b else [k, n]
    inputs = []
    inits = [("w", w)]
    if const_side == "B":
        names = ["a", "w"]
        inputs.append(("a", np.float32, a_shape))
    else:
        names = ["w", "b"]
        inputs.append(("b", np.float32, b_shape))
    if bias == "const":
        inits.append(("c", rng.standard_normal(n).astype(np.float32)))
        names.append("c")
    elif bias == "input":
        inputs.append(("c", np.float32, [m, n]))
        names.append("c")
    node = helper.make_node("Gemm", names, ["y"], name="gemm", transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    return make_model([node], inputs, [("y", np.float32, [m, n])], inits)


@pytest.mark.parametrize("const_side", ["B", "A"])
@pytest.mark.parametrize("bias", ["none", "const", "input"])
@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (0, 1), (1, 0), (1, 1)])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0)])
def test_rewrite_gemm_variants_exact(rng, const_side, bias, trans_a, trans_b, alpha, beta):
    model = _gemm_model(rng, trans_a, trans_b, alpha, beta, bias, const_side)
    out, report = optimize(model, min_size=1)
    onnx.checker.check_model(out, full_check=True)
    (record,) = report.layers
    assert record.compressed, record.reason
    assert [o.name for o in out.graph.output] == ["y"]
    feeds = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32) for i in model.graph.input}
    assert rel_fro(run_model(out, feeds)[0], run_model(model, feeds)[0]) < WIRING_RTOL


@pytest.mark.parametrize("x_shape", [[96], [5, 96], [3, 4, 96]])
def test_rewrite_right_matmul_any_rank(rng, x_shape):
    w = low_rank(rng, 96, 72)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [("x", np.float32, x_shape)],
        [("y", np.float32, x_shape[:-1] + [72])],
        [("w", w)],
    )
    out, report = optimize(model)
    assert report.layers[0].compressed and report.layers[0].name == "MatMul(y)"
    x = rng.standard_normal(x_shape).astype(np.float32)
    assert rel_fro(run_model(out, {"x": x})[0], run_model(model, {"x": x})[0]) < WIRING_RTOL


@pytest.mark.parametrize("x_shape", [[72], [72, 5], [3, 72, 5]])
def test_rewrite_left_matmul_any_rank(rng, x_shape):
    w = low_rank(rng, 96, 72)  # Y = W @ X
    out_shape = [96] if len(x_shape) == 1 else x_shape[:-2] + [96, x_shape[-1]]
    model = make_model(
        [helper.make_node("MatMul", ["w", "x"], ["y"], name="left")],
        [("x", np.float32, x_shape)],
        [("y", np.float32, out_shape)],
        [("w", w)],
    )
    out, report = optimize(model)
    (record,) = report.layers
    assert record.compressed and record.shape == [72, 96]
    x = rng.standard_normal(x_shape).astype(np.float32)
    assert rel_fro(run_model(out, {"x": x})[0], run_model(model, {"x": x})[0]) < WIRING_RTOL


def test_rewrite_left_matmul_unknown_rank_is_skipped(rng):
    w = low_rank(rng, 96, 72)
    nodes = [  # Reshape to a run-time shape of run-time length: the rank of x is unknown
        helper.make_node("Reshape", ["x_in", "shape"], ["x"], name="reshape"),
        helper.make_node("MatMul", ["w", "x"], ["y"], name="left"),
    ]
    model = make_model(nodes, [("x_in", np.float32, [72, 5]), ("shape", np.int64, ["k"])], [("y", np.float32, [96, 5])], [("w", w)])
    out, report = optimize(model)
    (record,) = report.layers
    assert record.skip_reason == "UNKNOWN_RANK" and "'x'" in record.reason
    assert out.SerializeToString() == model.SerializeToString()


def test_rewrite_fp16_weights_stay_fp16(rng):
    w = low_rank(rng, 128, 64, dtype=np.float16)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="half")],
        [("x", np.float16, ["B", 128])],
        [("y", np.float16, ["B", 64])],
        [("w", w)],
    )
    out, report = optimize(model, tol=1e-2)
    assert report.layers[0].compressed
    assert {t.data_type for t in out.graph.initializer if t.data_type != onnx.TensorProto.INT64} == {onnx.TensorProto.FLOAT16}
    x = rng.standard_normal((4, 128)).astype(np.float16)
    y = run_model(out, {"x": x})[0]
    assert y.dtype == np.float16
    exact = x.astype(np.float64) @ w.astype(np.float64)
    assert rel_fro(y, exact) <= output_bound(x, w, report.layers[0].rel_certified_error, np.float16)


def _shared_weight_model(rng):
    """``y = (x @ W) @ W`` with one low-rank 128 x 128 ``W`` read by both MatMuls."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="first"),
        helper.make_node("MatMul", ["h", "w"], ["y"], name="second"),
    ]
    return make_model(nodes, [("x", np.float32, ["B", 128])], [("y", np.float32, ["B", 128])], [("w", low_rank(rng, 128, 128))])


def test_rewrite_shared_weight_compressed_once(rng):
    model = _shared_weight_model(rng)
    out, report = optimize(model)
    assert [r.compressed for r in report.layers] == [True, True]
    emitted_params = sum(int(np.prod(t.dims)) for t in out.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    assert emitted_params == report.layers[0].params
    assert report.params_after == report.layers[0].params and report.params_before == 128 * 128
    x = rng.standard_normal((3, 128)).astype(np.float32)
    assert rel_fro(run_model(out, {"x": x})[0], run_model(model, {"x": x})[0]) < WIRING_RTOL


def test_rewrite_shared_weight_function_body_stored_once(rng):
    model = _shared_weight_model(rng)
    out, report = optimize(model, emit="function", no_verify=True)
    assert [r.emit for r in report.layers] == ["function", "function"]
    calls = [n for n in out.graph.node if n.op_type == "HMatMul"]
    assert len(calls) == 2 and calls[0].overload == calls[1].overload
    assert [f.overload for f in out.functions if f.name == "HMatMul"] == [calls[0].overload]
    x = rng.standard_normal((3, 128)).astype(np.float32)
    assert rel_fro(run_model(out, {"x": x})[0], run_model(model, {"x": x})[0]) < WIRING_RTOL


def test_rewrite_names_are_short_and_products_carry_provenance(rng):
    """Emitted names cost file bytes on small layers: they are ``hm<layer>/<base 36>``; every
    emitted product is tagged (so that it is never a candidate) and so is each layer's last node."""
    model = _mlp(rng)
    before = {v.name for v in model.graph.value_info} | {t.name for t in model.graph.initializer} | {"x", "h", "r", "y"}
    out, report = optimize(model, emit="ops", no_verify=True)
    new = [t.name for t in out.graph.initializer] + [o for n in out.graph.node for o in n.output]
    new = [name for name in new if name not in before]
    assert new and all(name.split("/")[0] in ("hm0", "hm1") and len(name.split("/")[1]) <= 2 for name in new)
    products = [n for n in out.graph.node if n.op_type == "MatMul"]
    assert products and all(is_emitted(n) for n in products)
    tags = {n.output[0]: {p.key: p.value for p in n.metadata_props} for n in out.graph.node if is_emitted(n)}
    assert tags["h"]["dehm.source_node"] == "fc1" and tags["y"]["dehm.source_node"] == "fc2"
    again, second = optimize(out, emit="ops", no_verify=True)
    assert not second.compressed and again.SerializeToString() == out.SerializeToString()


def test_rewrite_weight_shared_with_other_op_is_skipped(rng):
    w = low_rank(rng, 128, 128)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Add", ["h", "w"], ["y"], name="add"),
    ]
    model = make_model(nodes, [("x", np.float32, [128, 128])], [("y", np.float32, [128, 128])], [("w", w)])
    out, report = optimize(model)
    (record,) = report.layers
    assert record.skip_reason == "SHARED_WEIGHT" and "'add'" in record.reason
    assert out.SerializeToString() == model.SerializeToString()


def _if_model(rng, weight_inside: str):
    """``If(cond)``: then-branch ``x @ w`` (w outer initializer or inner Constant), else ``x``."""
    w = low_rank(rng, 128, 128)
    then_nodes = [helper.make_node("MatMul", ["x", "w"], ["t_out"], name="branch_mm")]
    if weight_inside == "constant":
        then_nodes.insert(0, helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w")))
    then_graph = helper.make_graph(then_nodes, "then", [], [helper.make_tensor_value_info("t_out", onnx.TensorProto.FLOAT, ["B", 128])])
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e_out"])], "else", [], [helper.make_tensor_value_info("e_out", onnx.TensorProto.FLOAT, ["B", 128])]
    )
    node = helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_graph, else_branch=else_graph)
    inits = [("w", w)] if weight_inside == "outer" else []
    return make_model([node], [("cond", np.bool_, []), ("x", np.float32, ["B", 128])], [("y", np.float32, ["B", 128])], inits)


@pytest.mark.parametrize("weight_inside", ["outer", "constant"])
def test_rewrite_weight_in_if_branch(rng, weight_inside):
    model = _if_model(rng, weight_inside)
    out, report = optimize(model)
    onnx.checker.check_model(out, full_check=True)
    (record,) = report.layers
    assert record.compressed and record.graph == "main/if.then_branch"
    x = rng.standard_normal((3, 128)).astype(np.float32)
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": x}
        assert rel_fro(run_model(out, feeds)[0], run_model(model, feeds)[0]) < WIRING_RTOL
    again, second = optimize(out)
    assert again.SerializeToString() == out.SerializeToString() and second.layers == []


def test_rewrite_outer_weight_shared_by_both_branches_stored_once(rng):
    w = low_rank(rng, 128, 128)

    def branch(name):
        return helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], [f"{name}_out"], name=f"{name}_mm")],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_out", onnx.TensorProto.FLOAT, ["B", 128])],
        )

    node = helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch("then"), else_branch=branch("else"))
    model = make_model([node], [("cond", np.bool_, []), ("x", np.float32, ["B", 128])], [("y", np.float32, ["B", 128])], [("w", w)])
    out, report = optimize(model)
    assert [r.compressed for r in report.layers] == [True, True]
    factors = [t for t in out.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert sum(int(np.prod(t.dims)) for t in factors) == report.layers[0].params == report.params_after
    x = rng.standard_normal((2, 128)).astype(np.float32)
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": x}
        assert rel_fro(run_model(out, feeds)[0], run_model(model, feeds)[0]) < WIRING_RTOL


def test_rewrite_keeps_everything_else(rng):
    model = _mlp(rng)
    model.producer_name, model.doc_string, model.graph.doc_string = "me", "model doc", "graph doc"
    onnx.helper.set_model_props(model, {"author": "someone"})
    relu = model.graph.node[1]
    relu.doc_string = "keep me"
    entry = relu.metadata_props.add()
    entry.key, entry.value = "origin", "relu"
    model.graph.value_info.append(helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, ["B", 96]))
    model.opset_import.append(helper.make_opsetid("com.example", 3))
    out, report = optimize(model, emit="subgraph")  # standard ops: no new domain
    assert len(report.compressed) == 2
    assert (out.producer_name, out.doc_string, out.graph.doc_string) == ("me", "model doc", "graph doc")
    assert {p.key: p.value for p in out.metadata_props}["author"] == "someone"
    kept = next(n for n in out.graph.node if n.name == "relu")
    assert kept.SerializeToString() == relu.SerializeToString()
    assert list(out.graph.value_info) == list(model.graph.value_info)
    assert list(out.opset_import) == list(model.opset_import)
    assert (out.ir_version, list(out.graph.input), list(out.graph.output)) == (model.ir_version, list(model.graph.input), list(model.graph.output))


def test_rewrite_every_form_within_certified_bound(rng):
    """Numerically low-rank (not exact) weights in every candidate form, each layer run alone."""
    from tests.conftest import assert_layers_within_bound

    k = smooth_kernel(160, 128)
    nodes = [
        helper.make_node("MatMul", ["x", "k"], ["y_right"], name="right"),
        helper.make_node("MatMul", ["kt", "z"], ["y_left"], name="left"),
        helper.make_node("Gemm", ["xt", "kt", "c"], ["y_gemm_b"], name="gemm_b", transA=1, transB=1, alpha=0.5, beta=2.0),
        helper.make_node("Gemm", ["k", "z2", "c2"], ["y_gemm_a"], name="gemm_a", transA=1, alpha=-1.5),
    ]
    model = make_model(
        nodes,
        [("x", np.float32, [4, 160]), ("z", np.float32, [160, 4]), ("xt", np.float32, [160, 4]), ("z2", np.float32, [160, 4]), ("c2", np.float32, [128, 4])],
        [("y_right", np.float32, [4, 128]), ("y_left", np.float32, [128, 4]), ("y_gemm_b", np.float32, [4, 128]), ("y_gemm_a", np.float32, [128, 4])],
        [("k", k), ("kt", np.ascontiguousarray(k.T)), ("c", rng.standard_normal(128).astype(np.float32))],
    )
    optimized, report = optimize(model, tol=1e-2, no_verify=True)
    assert [r.compressed for r in report.layers] == [True] * 4
    assert all(0 < r.rel_certified_error <= 1e-2 for r in report.layers)
    measured = assert_layers_within_bound(model, optimized, report, rng, batch=8)
    assert set(measured) == {"right", "left", "gemm_b", "gemm_a"}


def test_rewrite_float64_weights(rng):
    w = smooth_kernel(128, 96, dtype=np.float64)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="f64")],
        [("x", np.float64, ["B", 128])],
        [("y", np.float64, ["B", 96])],
        [("w", w)],
    )
    out, report = optimize(model, tol=1e-6)
    (record,) = report.layers
    assert record.compressed and record.rel_certified_error <= 1e-6
    assert {t.data_type for t in out.graph.initializer if t.data_type != onnx.TensorProto.INT64} == {onnx.TensorProto.DOUBLE}
    x = rng.standard_normal((3, 128))
    y = run_model(out, {"x": x})[0]
    assert y.dtype == np.float64 and rel_fro(y, x @ w) <= output_bound(x, w, record.rel_certified_error, np.float64)


def test_emit_subgraph_is_an_alias_of_ops():
    from dehm_onnx.config import OptimizeConfig

    assert OptimizeConfig(emit="subgraph").emit == "ops"


def test_record_says_the_mode_actually_emitted(rng):
    # HMatMul takes float32/float16: a float64 layer asked for as 'function' is written as ops.
    w = smooth_kernel(128, 96, dtype=np.float64)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                       [("x", np.float64, ["B", 128])], [("y", np.float64, ["B", 96])], [("w", w)])
    out, report = optimize(model, emit="function", no_verify=True)
    (record,) = report.layers
    assert record.compressed and record.emit == "ops" and not out.functions
    assert {e["emit"] for e in read_layers(out)} == {"ops"}


def test_omitted_optional_outputs_are_not_a_rewrite_error(rng):
    w = smooth_kernel(96, 80)
    nodes = [
        helper.make_node("Dropout", ["x"], ["d", ""]),  # the mask output omitted
        helper.make_node("MatMul", ["d", "w"], ["y"], name="mm"),
    ]
    model = make_model(nodes, [("x", np.float32, [2, 96])], [("y", np.float32, [2, 80])], [("w", w)])
    out, report = optimize(model, no_verify=True)
    assert report.layers[0].compressed and out.graph.node[0].output[0] == "d"  # a trailing "" may be dropped
    onnx.checker.check_model(out)


def test_byte_check_counts_shared_decoder_functions_once(rng, monkeypatch):
    """Two like layers in ``function`` mode with integer storage: the second layer's byte
    check does not pay again for the ``ai.dehm`` decoder functions the first one brought."""
    from dehm_onnx.graph import rewrite

    seen = []
    real = rewrite.check_gain
    monkeypatch.setattr(rewrite, "check_gain", lambda after, before, *a: seen.append(after) or real(after, before, *a))
    w = smooth_kernel(128, 128)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2")]
    model = make_model(nodes, [("x", np.float32, ["B", 128])], [("y", np.float32, ["B", 128])], [("w1", w), ("w2", 2 * w)])
    out, report = dehm_onnx.optimize(model, emit="function", precision="int8", tol=1e-2, no_verify=True)
    assert [r.compressed for r in report.layers] == [True, True]
    decoders = [f for f in out.functions if f.name.startswith("Decode")]
    assert decoders and len({f.name for f in decoders}) == len(decoders)
    decoder_bytes = sum(f.ByteSize() for f in decoders)
    assert len(seen) == 2 and seen[0] - seen[1] >= 0.9 * decoder_bytes, (seen, decoder_bytes)
