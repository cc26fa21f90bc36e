"""verify(): per-layer output bounds and per-output errors against hand-made optimized models."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import dehm_onnx
from ._models import graded_matrix, lowrank_optimized, mlp, scale_initializer, truncate
from dehm_onnx.errors import BoundViolation, InvalidModelError
from dehm_onnx.verify import read_layers, verify
from dehm_onnx.verify.runner import expose_outputs, extract_layer_model, make_cpu_session


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    orig = mlp([graded_matrix(rng, 64, 48, 0.8), graded_matrix(rng, 48, 32, 0.8)])
    # Weight tol 0.05; each layer's output bound 0.1 leaves room for per-sample spread.
    return orig, lowrank_optimized(orig, {"fc0": 0.05, "fc1": 0.05}, {"fc0": 0.1, "fc1": 0.1})


def _calib(n=64, seed=1, rows=16):
    return {"x": np.random.default_rng(seed).standard_normal((n, rows, 64)).astype(np.float32)}


def _isotropic_calib():
    # One sample whose rows are an orthonormal basis times a constant: X^T X = c I, so
    # ||XE||_F = c ||E||_F exactly.
    q, _ = np.linalg.qr(np.random.default_rng(2).standard_normal((64, 64)))
    return {"x": (q * 3.0).astype(np.float32)[None]}


def test_verify_good_model_holds_every_bound(pair):
    orig, opt = pair
    result = verify(orig, opt, _isotropic_calib())
    assert result.ok and not result.violations
    by_name = {layer.name: layer for layer in result.layers}
    assert set(by_name) == {"fc0", "fc1"}
    assert all(layer.isolated and layer.rel_fro_error <= layer.tol_out for layer in result.layers)
    # fc0 sees isotropic X: its output error equals the certified weight error (float32 rounding aside).
    assert by_name["fc0"].rel_fro_error == pytest.approx(by_name["fc0"].rel_certified_error, rel=1e-3)
    # In the full model fc1 also sees fc0's error, so its in-model error is larger.
    assert by_name["fc1"].rel_fro_error_in_model > by_name["fc1"].rel_fro_error
    (out,) = result.outputs
    assert out.name == "y" and 0 < out.rel_l2 < 0.2 and out.cosine > 0.98 and out.max_abs > 0


def test_verify_identical_models_measures_no_error(pair):
    orig, opt = pair
    opt_same = onnx.ModelProto()
    opt_same.CopyFrom(orig)
    helper.set_model_props(opt_same, {"dehm.layers": json.dumps(read_layers(opt))})
    result = verify(orig, opt_same, _calib(8))
    assert all(layer.rel_fro_error == 0.0 for layer in result.layers)
    assert result.outputs[0].rel_l2 == 0.0 and result.outputs[0].cosine == pytest.approx(1.0)


def test_verify_tampered_weight_names_the_layer(pair):
    orig, opt = pair
    tampered = scale_initializer(opt, "W1.vt", 1.2)
    result = verify(orig, tampered, _calib())
    assert [layer.name for layer in result.violations] == ["fc1"]
    bad = result.violations[0]
    # Scaling by 1.2 adds 20% of Y_H on top of the truncation error.
    assert bad.rel_fro_error > 0.15 > bad.tol_out
    with pytest.raises(BoundViolation, match=r"layer 'fc1' \(MatMul, 48x32\): measured rel. error .* \(worst sample\) > tol_out 1.000e-01") as info:
        result.raise_if_violated()
    assert [r.name for r in info.value.records] == ["fc1"]


def test_verify_detects_inputs_in_weak_directions():
    """Weight bound holds, output bound fails: X lies in W's discarded singular directions."""
    rng = np.random.default_rng(3)
    w = graded_matrix(rng, 64, 48, 0.8)
    orig = mlp([w])
    opt = lowrank_optimized(orig, {"fc0": 0.05})
    (layer,) = read_layers(opt)
    assert layer["rel_certified_error"] <= 0.05
    u, _, _ = np.linalg.svd(w)
    weak = u[:, 30:48]  # left singular directions dropped by the truncation
    x = (rng.standard_normal((32, 18)) @ weak.T).astype(np.float32)[:, None, :]
    result = verify(orig, opt, {"x": x})
    assert not result.ok and result.violations[0].rel_fro_error > 0.5


def test_verify_collects_input_gram_and_spectral_norm(pair):
    orig, opt = pair
    calib = _calib(16)
    result = verify(orig, opt, calib, collect_stats=True)
    stats = result.stats["fc0"]
    x = calib["x"].reshape(-1, 64).astype(np.float64)
    assert stats.rows == 16 * 16
    np.testing.assert_allclose(stats.gram, x.T @ x, rtol=1e-5, atol=1e-5)
    assert stats.spectral_norm == pytest.approx(np.linalg.norm(x, 2), rel=1e-6)


def test_verify_result_serializes_and_tabulates(pair):
    orig, opt = pair
    result = verify(orig, opt, _calib(4))
    data = json.loads(result.to_json())
    assert data["ok"] is True and data["num_samples"] == 4
    assert [layer["name"] for layer in data["layers"]] == ["fc0", "fc1"]
    assert data["layers"][0]["shape"] == [64, 48] and "rel_fro_error" in data["layers"][0]
    table = result.table()
    assert "fc0" in table and "MatMul" in table and "all layer bounds hold" in table


def test_verify_is_exported_lazily_and_callable(pair):
    orig, opt = pair
    assert dehm_onnx.verify(orig, opt, _calib(2)).ok
    assert dehm_onnx.verify(orig, opt, _calib(2)).ok  # also once the subpackage is imported


def test_verify_without_metadata_is_bad_input(pair):
    orig, opt = pair
    del opt.metadata_props[:]
    with pytest.raises(InvalidModelError, match="dehm.layers"):
        verify(orig, opt, _calib(2))


def test_verify_of_a_model_never_optimized_is_bad_input(pair):
    orig, opt = pair
    with pytest.raises(InvalidModelError, match=r"OPT has no compressed layers \(no dehm.layers metadata\)"):
        verify(orig, orig, _calib(2))
    helper.set_model_props(opt, {"dehm.layers": "[]"})
    with pytest.raises(InvalidModelError, match="OPT has no compressed layers"):
        verify(orig, opt, _calib(2))


def test_verify_rejects_models_with_different_inputs(pair):
    orig, opt = pair
    opt.graph.input[0].name = "other"
    for node in opt.graph.node:  # a valid model whose input has another name
        node.input[:] = ["other" if name == "x" else name for name in node.input]
    with pytest.raises(InvalidModelError, match="different inputs"):
        verify(orig, opt, _calib(2))


def test_verify_rejects_missing_model_file(tmp_path, pair):
    _, opt = pair
    with pytest.raises(InvalidModelError, match="does not exist"):
        verify(tmp_path / "none.onnx", opt)


def _gemm_pair(tol=0.02):
    """Gemm(x, B, c, transB=1): Y = x @ B^T + c; optimized as (x @ U) @ Vt + c."""
    rng = np.random.default_rng(4)
    w = graded_matrix(rng, 40, 24, 0.75)  # Y = X @ w, so B = w^T
    c = rng.standard_normal(24).astype(np.float32)
    inits = [numpy_helper.from_array(w.T.astype(np.float32), "B"), numpy_helper.from_array(c, "c")]
    node = helper.make_node("Gemm", ["x", "B", "c"], ["y"], name="proj", transB=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 40])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 24])], inits)
    orig = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    u, vt, err = truncate(w, tol)
    opt_nodes = [helper.make_node("MatMul", ["x", "B.u"], ["t0"]), helper.make_node("MatMul", ["t0", "B.vt"], ["t1"]),
                 helper.make_node("Add", ["t1", "c"], ["y"])]
    opt_inits = [numpy_helper.from_array(u.astype(np.float32), "B.u"),
                 numpy_helper.from_array(vt.astype(np.float32), "B.vt"), inits[1]]
    opt = helper.make_model(helper.make_graph(opt_nodes, "g", list(graph.input), list(graph.output), opt_inits),
                            opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    record = dict(name="proj", op="Gemm", output="y", weight="B", x="x", x_transposed=False, shape=[40, 24], tol=tol, tol_out=tol,
                  rel_certified_error=err, params=int(u.size + vt.size), dense_params=960, emit="ops")
    helper.set_model_props(opt, {"dehm.layers": json.dumps([record])})
    return orig, opt, err


def test_verify_gemm_with_bias_measures_output_error():
    orig, opt, err = _gemm_pair()
    x = np.random.default_rng(5).standard_normal((32, 3, 40)).astype(np.float32)
    result = verify(orig, opt, {"x": x}, collect_stats=True)
    (layer,) = result.layers
    assert layer.isolated and layer.ok and 0 < layer.rel_fro_error < 0.1
    assert result.stats["proj"].rows == 96


def _if_model():
    """A MatMul inside an If branch: its output cannot be exposed."""
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")
    branch = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["inner"])], "then", [],
                               [helper.make_tensor_value_info("inner", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["inner2"])], "else", [],
                              [helper.make_tensor_value_info("inner2", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("If", ["flag"], ["y"], then_branch=branch, else_branch=other)]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]), helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_expose_outputs_skips_subgraph_tensors_with_a_note():
    exposed = expose_outputs(_if_model(), ["inner", "ghost", "y"])
    assert exposed.exposed == ["y"]
    assert any("'inner'" in n and "subgraph" in n for n in exposed.notes)
    assert any("'ghost'" in n and "nowhere" in n for n in exposed.notes)


def test_verify_reports_subgraph_layer_as_not_checked():
    model = _if_model()
    opt = onnx.ModelProto()
    opt.CopyFrom(model)
    record = dict(name="inner_mm", op="MatMul", output="inner", weight="W", shape=[4, 4], tol=0.1, tol_out=0.1)
    helper.set_model_props(opt, {"dehm.layers": json.dumps([record])})
    calib = {"x": np.ones((2, 2, 4), np.float32), "flag": np.array([True, False])}
    result = verify(model, opt, calib)
    (layer,) = result.layers
    assert result.ok and not layer.checked and "not checked" in result.table()
    assert any("subgraph" in n for n in result.notes)


def test_extract_layer_model_reproduces_the_layer(pair):
    _, opt = pair
    layer = extract_layer_model(opt, "a0", "h1", np.float32)
    x = np.random.default_rng(0).standard_normal((3, 48)).astype(np.float32)
    (y,) = make_cpu_session(layer).run(["h1"], {"a0": x})
    inits = {t.name: numpy_helper.to_array(t) for t in opt.graph.initializer}
    np.testing.assert_allclose(y, x @ inits["W1.u"] @ inits["W1.vt"], rtol=1e-5, atol=1e-5)
    assert extract_layer_model(opt, "x", "nowhere", np.float32) is None


def test_sessions_for_models_beyond_protobuf_limit_go_through_a_file(pair, monkeypatch):
    from dehm_onnx.ops import library

    orig, opt = pair
    before = orig.SerializeToString()
    monkeypatch.setattr(library, "_PROTO_LIMIT", 1)  # every model takes the file route
    result = verify(orig, opt, _calib(4))
    assert result.ok and all(layer.isolated for layer in result.layers)
    assert orig.SerializeToString() == before


def test_verify_layer_output_that_is_also_a_graph_output():
    rng = np.random.default_rng(6)
    orig = mlp([graded_matrix(rng, 32, 24, 0.7)])
    orig.graph.output.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, None))
    opt = lowrank_optimized(orig, {"fc0": 0.1})
    result = verify(orig, opt, {"x": rng.standard_normal((3, 1, 32)).astype(np.float32)})
    assert [o.name for o in result.outputs] == ["y", "h0"]
    assert result.layers[0].rel_fro_error == pytest.approx(result.outputs[1].worst)
    assert result.layers[0].median_error == pytest.approx(result.outputs[1].median)


def test_verify_checks_the_worst_sample_not_the_aggregate():
    """One sample along dropped directions among many benign ones: the aggregate hides it."""
    rng = np.random.default_rng(3)
    w = graded_matrix(rng, 64, 48, 0.8)
    orig = mlp([w])
    opt = lowrank_optimized(orig, {"fc0": 0.05}, {"fc0": 0.06})
    u, _, _ = np.linalg.svd(w)
    benign = 10.0 * rng.standard_normal((15, 4, 64)) @ u[:, :8] @ u[:, :8].T  # kept directions only
    weak = (rng.standard_normal((1, 4, 18)) @ u[:, 30:48].T)  # dropped directions only
    x = np.concatenate([benign, weak]).astype(np.float32)
    result = verify(orig, opt, {"x": x})
    (layer,) = result.layers
    assert layer.median_error < 1e-3 and layer.sample_errors[-1] > 0.5
    assert layer.rel_fro_error == max(layer.sample_errors) and not result.ok
    # The aggregate over all samples (what was checked before) stays within the bound.
    assert result.outputs[0].rel_l2 < 0.06 < result.outputs[0].worst


def test_verify_held_out_samples_are_reported_but_do_not_decide(pair):
    orig, opt = pair
    calib = _calib(8)
    calib["x"][-1] *= 0  # a zero sample: its error is 0, so only the split decides below
    tampered = scale_initializer(opt, "W0.u", 1.2)
    result = verify(orig, tampered, calib, held_out=2)
    (fc0, fc1) = result.layers
    assert result.held_out == 2 and len(fc0.sample_errors) == 8
    assert fc0.rel_fro_error == max(fc0.sample_errors[:6]) and fc0.held_out_error == max(fc0.sample_errors[6:])
    assert fc0.median_error == pytest.approx(float(np.median(fc0.sample_errors)))
    assert "held-out worst" in result.table() and not fc0.ok
    # Only the 6 checked samples decide: a violation seen only in the held-out part passes.
    weak_last = {"x": np.concatenate([_calib(5)["x"] * 0, _calib(1, seed=9)["x"]])}
    only_held = verify(orig, tampered, weak_last, held_out=1)
    assert only_held.layers[0].held_out_error > 0.1 and only_held.layers[0].rel_fro_error == 0.0 and only_held.ok


def _nan_pair():
    """Identity-weight layer then Log: a tampered weight makes a finite output NaN."""
    rng = np.random.default_rng(8)
    w = np.abs(graded_matrix(rng, 16, 16, 0.9)) + 0.1
    orig = mlp([w])
    log = helper.make_node("Log", ["h0"], ["y_log"])
    orig.graph.node.insert(1, log)
    orig.graph.node[-1].input[0] = "y_log"
    opt = lowrank_optimized(orig, {"fc0": 0.05})
    return orig, scale_initializer(opt, "W0.u", -1.0)  # every output negative: Log gives NaN


def test_verify_non_finite_output_where_the_original_is_finite_is_an_infinite_error():
    orig, opt = _nan_pair()
    x = np.abs(np.random.default_rng(0).standard_normal((4, 3, 16))).astype(np.float32)
    result = verify(orig, opt, {"x": x})
    (out,) = result.outputs
    assert out.non_finite > 0 and out.worst == float("inf") and result.model_error() == float("inf")
    assert "NaN/Inf" in result.table()
    json.loads(result.to_json())  # inf is written as a string


def test_collected_statistics_stay_small(pair, monkeypatch):
    """Few rows: the rows themselves, not an m x m Gram matrix; and a byte budget for all layers."""
    from dehm_onnx.verify import check

    orig, opt = pair
    calib = _calib(3, rows=2)  # 6 rows of width 64
    stats = verify(orig, opt, calib, collect_stats=True).stats["fc0"]
    assert stats.inputs.shape == (6, 64) and not stats.folded
    x = calib["x"].reshape(-1, 64).astype(np.float64)
    np.testing.assert_allclose(stats.gram, x.T @ x, rtol=1e-5, atol=1e-5)
    folded = verify(orig, opt, _calib(5, rows=16), collect_stats=True).stats["fc0"]
    assert folded.folded and folded.inputs.shape == (64, 64) and folded.rows == 80
    assert set(verify(orig, opt, calib, collect_stats=True).stats) == {"fc0", "fc1"}
    monkeypatch.setattr(check, "STATS_BYTES", 1024)  # fc0's first sample (2 x 64 float64) fills it
    assert verify(orig, opt, calib, collect_stats=True).stats == {}


def test_layer_model_carries_only_its_own_functions():
    """--emit function keeps each layer's factors in its own function: a layer model must not
    copy every layer's (n layer models would hold n copies of the compressed model)."""
    rng = np.random.default_rng(12)
    orig = mlp([graded_matrix(rng, 96, 96, 0.8), graded_matrix(rng, 96, 64, 0.8)])
    opt, report = dehm_onnx.optimize(orig, tol=0.05, min_size=8, emit="function", no_verify=True)
    assert len(report.compressed) == 2 and len(opt.functions) >= 2
    layer = extract_layer_model(opt, "a0", "h1", np.float32)
    assert 1 <= len(layer.functions) < len(opt.functions)
    x = np.random.default_rng(0).standard_normal((3, 96)).astype(np.float32)
    assert make_cpu_session(layer).run(["h1"], {"a0": x})[0].shape == (3, 64)


def test_verify_takes_the_activation_input_from_the_record(pair):
    orig, opt = pair
    records = read_layers(opt)
    without_x = [{k: v for k, v in r.items() if k not in ("x", "x_transposed")} for r in records]
    result = verify(orig, opt, _calib(4), layers=without_x)
    assert not any(layer.isolated for layer in result.layers)
    assert all("names no activation input" in layer.note for layer in result.layers)
    assert all(layer.isolated for layer in verify(orig, opt, _calib(4), layers=records).layers)
