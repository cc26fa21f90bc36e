"""Hostile input: NaN/Inf, zero-size dims, duplicate names, missing inputs, traversal via the CLI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from dehm_onnx import api
from dehm_onnx.errors import InvalidModelError
from tests.conftest import smooth_kernel

from ._models import mlp, save_external, set_entry

N = 64


def _model(nodes, initializers):
    graph = helper.make_graph(
        nodes,
        "hostile",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", N])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["B", None])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _matmul(w: np.ndarray):
    return _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], [numpy_helper.from_array(w, "w")])


def _with_non_finite(value) -> np.ndarray:
    w = smooth_kernel(N, N)
    w[3, 5] = value
    w[7, 1] = value
    return w


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_weight_is_left_dense_with_its_reason(value):
    _, report = api.optimize(_matmul(_with_non_finite(value)), min_size=8, no_verify=True)
    (layer,) = report.layers
    assert not layer.compressed and layer.skip_reason == "NON_FINITE" and "2 NaN/Inf" in layer.reason


@pytest.mark.parametrize("jobs", [1, 2])
def test_non_finite_external_weight_is_found_when_memory_mapped(tmp_path, jobs):
    model = mlp(layers=2, n=N)
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(_with_non_finite(np.nan), "w1"))
    path = save_external(model, tmp_path / "in")
    report = api.optimize_file(path, tmp_path / "out.onnx", min_size=8, no_verify=True, jobs=jobs)
    skipped = {r.weight: r.skip_reason for r in report.layers if not r.compressed}
    assert skipped == {"w1": "NON_FINITE"} and len(report.compressed) == 1


@pytest.mark.parametrize("min_size", [8, 1])
def test_zero_size_weight_is_left_dense(min_size):
    model = _matmul(np.zeros((N, 0), np.float32))
    optimized, report = api.optimize(model, min_size=min_size, no_verify=True)
    (layer,) = report.layers
    assert not layer.compressed and layer.skip_reason == "TOO_SMALL"  # min(rows, cols) = 0 < min_size >= 1
    assert [n.op_type for n in optimized.graph.node] == ["MatMul"]


def test_zero_size_external_weight_is_left_dense(tmp_path):
    model = _matmul(np.zeros((N, 0), np.float32))
    path = save_external(model, tmp_path / "in")
    report = api.optimize_file(path, tmp_path / "out.onnx", min_size=1, no_verify=True, jobs=1)
    assert not report.layers[0].compressed


def _retyped(data_type: int) -> onnx.TensorProto:
    tensor = numpy_helper.from_array(smooth_kernel(N, N), "w")
    tensor.data_type = data_type  # raw_data now has the wrong size or an unknown element type
    return tensor


@pytest.mark.parametrize("data_type", [onnx.TensorProto.BFLOAT16, 1000], ids=["raw-data-too-long", "unknown-type"])
def test_undecodable_weight_is_an_invalid_model(data_type):
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [_retyped(data_type)])
    with pytest.raises(InvalidModelError, match="'w'"):
        api.optimize(model, no_verify=True, min_size=8)


_HOSTILE_GRAPHS = {
    "duplicate initializer names": (
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [numpy_helper.from_array(smooth_kernel(N, N), "w"), numpy_helper.from_array(smooth_kernel(N, N), "w")],
        "not unique",
    ),
    "input nobody produces": ([helper.make_node("MatMul", ["x", "nowhere"], ["y"])], [], "nowhere"),
    "empty required input": ([helper.make_node("MatMul", ["x", ""], ["y"])], [], "empty string"),
    "output written twice": (
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("MatMul", ["x", "w"], ["y"])],
        [numpy_helper.from_array(smooth_kernel(N, N), "w")],
        "single static assignment",
    ),
}


@pytest.mark.parametrize("case", sorted(_HOSTILE_GRAPHS))
def test_malformed_graph_is_refused_by_the_api(case):
    nodes, inits, message = _HOSTILE_GRAPHS[case]
    with pytest.raises(InvalidModelError, match=message):
        api.optimize(_model(nodes, inits), no_verify=True)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "dehm_onnx", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def _assert_clean_failure(proc, folder, before):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing written, no temp files


@pytest.mark.parametrize("case", ["duplicate initializer names", "input nobody produces"])
def test_malformed_graph_exits_2_with_one_line(tmp_path, case):
    nodes, inits, message = _HOSTILE_GRAPHS[case]
    path = tmp_path / "in.onnx"
    path.write_bytes(_model(nodes, inits).SerializeToString())
    proc = _cli("optimize", path, tmp_path / "out.onnx", "--no-verify")
    _assert_clean_failure(proc, tmp_path, ["in.onnx"])
    assert message in proc.stderr


@pytest.mark.parametrize(
    "location, message",
    [("/etc/hostname", "absolute path"), ("../../etc/hostname", "'..'"), ("link.data", "outside the model's folder")],
)
def test_cli_refuses_external_data_outside_the_folder(tmp_path, location, message):
    folder = tmp_path / "in"
    path = save_external(mlp(layers=1, n=N), folder)
    (folder / "link.data").symlink_to(tmp_path)
    set_entry(path, "w0", "location", location)
    out = tmp_path / "out"
    out.mkdir()
    proc = _cli("optimize", path, out / "o.onnx", "--no-verify")
    _assert_clean_failure(proc, out, [])
    assert message in proc.stderr and "'w0'" in proc.stderr
