"""Big-model path on small models: lazy external weights, OUT.data, --jobs, progress, bytes."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir
import pytest

from dehm_onnx import api
from dehm_onnx.errors import ConfigError, InvalidModelError
from dehm_onnx.progress import ProgressBar
from tests.conftest import output_bound, rel_fro, run_model

from ._models import mlp, save_external, weights

TOL = 1e-3


def _external(model):
    """The main-graph tensors (initializers, Constant values) of ``model`` whose data is external."""
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node for a in n.attribute if a.HasField("t")]
    return [t for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL]


def _cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "dehm_onnx", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    model = mlp(layers=4, n=96)
    return save_external(model, tmp_path_factory.mktemp("src")), model


def test_optimize_file_reads_external_weights_lazily_and_writes_out_data(source, tmp_path, monkeypatch):
    path, model = source
    before = {p.name: p.read_bytes() for p in path.parent.iterdir()}

    def no_materialize(*args, **kwargs):
        raise AssertionError("the weights must not be loaded as a whole")

    monkeypatch.setattr(onnx_ir.external_data, "load_to_model", no_materialize)
    out = tmp_path / "out.onnx"
    # precision float: factors above the 1 KB threshold of the data file (int4 ones are not)
    report = api.optimize_file(path, out, tol=TOL, min_size=8, no_verify=True, jobs=1, precision="float")
    assert len(report.compressed) == 4
    assert _files(tmp_path) == ["out.onnx", "out.onnx.data"]
    assert {p.name: p.read_bytes() for p in path.parent.iterdir()} == before  # input untouched
    assert report.bytes_after == out.stat().st_size + (tmp_path / "out.onnx.data").stat().st_size
    lazy = onnx.load(out, load_external_data=False)
    locations = {e.value for t in _external(lazy) for e in t.external_data if e.key == "location"}
    assert locations == {"out.onnx.data"}
    # The lazy path computes exactly what the in-memory API does (whose numerics are tested
    # elsewhere): same nodes, same factors.
    in_memory, _ = api.optimize(model, tol=TOL, min_size=8, no_verify=True, jobs=1, precision="float")
    written = onnx.load(out)
    assert [n.op_type for n in written.graph.node] == [n.op_type for n in in_memory.graph.node]
    assert weights(written).keys() == weights(in_memory).keys()
    for name, value in weights(in_memory).items():
        np.testing.assert_array_equal(weights(written)[name], value)


def test_external_constant_node_weights_and_dense_weights_are_handled(tmp_path):
    from onnx import helper, numpy_helper

    from ._models import kernel_weight

    kept = np.random.default_rng(0).standard_normal((96, 96)).astype(np.float32)  # does not compress in float
    model = helper.make_model(
        helper.make_graph(
            [
                helper.make_node("Constant", [], ["wc"], value=numpy_helper.from_array(kernel_weight(96, 0.3), "wc")),
                helper.make_node("MatMul", ["x", "wc"], ["h"], name="fc_const"),
                helper.make_node("MatMul", ["h", "kept"], ["y"], name="fc_dense"),
            ],
            "g",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", 96])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["B", 96])],
            [numpy_helper.from_array(kept, "kept")],
        ),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    path = tmp_path / "in" / "m.onnx"
    path.parent.mkdir()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save(copy, path, save_as_external_data=True, location="m.data", size_threshold=0, convert_attribute=True)
    assert len(_external(onnx.load(path, load_external_data=False))) == 2
    out = tmp_path / "out.onnx"
    report = api.optimize_file(path, out, tol=TOL, min_size=8, no_verify=True, jobs=1, precision="float")
    assert [r.name for r in report.compressed] == ["fc_const"]
    assert {r.name: r.skip_reason for r in report.layers if not r.compressed} == {"fc_dense": "NOT_SMALLER"}
    np.testing.assert_array_equal(weights(onnx.load(out))["kept"], kept)  # copied to out.onnx.data
    x = np.random.default_rng(1).standard_normal((2, 96)).astype(np.float32)
    (h,) = run_model(onnx.load(out), {"x": x}, outputs=["h"])
    w = kernel_weight(96, 0.3)
    assert rel_fro(h, x @ w) <= output_bound(x, w, report.compressed[0].rel_certified_error)


def test_output_bytes_identical_across_runs_and_jobs(source, tmp_path):
    path, _ = source
    outputs = []
    for i, jobs in enumerate((1, 2, 2)):
        out = tmp_path / f"run{i}" / "out.onnx"
        out.parent.mkdir()
        api.optimize_file(path, out, tol=TOL, min_size=8, no_verify=True, jobs=jobs)
        outputs.append((out.read_bytes(), (out.parent / "out.onnx.data").read_bytes()))
    assert outputs[0] == outputs[1] == outputs[2]


def test_external_data_flag_forces_a_data_file_for_an_in_memory_input(tmp_path):
    path = tmp_path / "small.onnx"
    onnx.save(mlp(layers=1, n=96), path)
    assert _cli("optimize", path, tmp_path / "a.onnx", "--min-size", "8", "--no-verify", "-q").returncode == 0
    assert _cli("optimize", path, tmp_path / "b.onnx", "--min-size", "8", "--no-verify", "-q", "--external-data").returncode == 0
    assert _files(tmp_path) == ["a.onnx", "b.onnx", "b.onnx.data", "small.onnx"]


def test_cli_on_external_model_verifies_in_memory_when_small(source, tmp_path):
    path, _ = source
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    proc = _cli("optimize", path, out, "--tol", TOL, "--min-size", "8", "--jobs", "2", "--report", report)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    assert data["verification"]["performed"] is True
    assert _files(tmp_path) == ["out.onnx", "out.onnx.data", "r.json"]
    assert "\r" not in proc.stderr  # no progress bar when stderr is not a terminal


def test_external_model_is_verified_with_its_weights_left_in_their_files(source, tmp_path, monkeypatch):
    """No size limit: onnxruntime maps the weights from the input's data file (issue 11, item 14)."""
    path, _ = source
    materialized = []
    monkeypatch.setattr(onnx_ir.external_data, "load_to_model", lambda *a, **k: materialized.append(a))
    report = api.optimize_file(path, tmp_path / "out.onnx", tol=TOL, min_size=8, jobs=1)
    assert report.verification["performed"] is True and not materialized
    assert all(r.measured_error is not None and r.measured_error <= r.tol_out for r in report.compressed)


def test_verification_sessions_map_external_weights_from_the_weights_from_folder(source, tmp_path, monkeypatch):
    """The session seam of item 14: a proto that keeps its external references runs in
    onnxruntime only with the folder of its data files, never read from the working folder."""
    from dehm_onnx import model_io
    from dehm_onnx.verify.runner import make_cpu_session

    path, model = source
    lazy = onnx.load(path, load_external_data=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidModelError, match="folder is unknown"):
        make_cpu_session(lazy)
    with model_io.weights_from(path.parent):
        session = make_cpu_session(lazy)
    x = np.random.default_rng(0).standard_normal((2, 96)).astype(np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], run_model(model, {"x": x})[0])


def test_output_data_file_may_not_be_the_inputs(tmp_path):
    folder = tmp_path / "m"
    path = save_external(mlp(layers=1, n=96), folder, name="in.onnx", location="out.onnx.data")
    before = (folder / "out.onnx.data").read_bytes()
    proc = _cli("optimize", path, folder / "out.onnx", "--min-size", "8", "--no-verify")
    assert proc.returncode == 2 and "is the same file as a data file of IN" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert (folder / "out.onnx.data").read_bytes() == before
    assert _files(folder) == ["in.onnx", "out.onnx.data"]


def test_output_may_not_be_the_inputs_data_file(source):
    path, _ = source
    data = path.parent / "model.onnx.data"
    before = data.read_bytes()
    with pytest.raises(ConfigError, match="is the same file as a data file of IN"):
        api.optimize_file(path, data, no_verify=True)
    assert data.read_bytes() == before


def test_optimize_file_refuses_output_equal_to_input(source):
    path, _ = source
    with pytest.raises(ConfigError, match="is the same file as IN"):
        api.optimize_file(path, path, no_verify=True)


def test_in_memory_api_materializes_validated_external_data(source):
    path, model = source
    optimized, report = api.optimize(path, tol=TOL, min_size=8, no_verify=True, jobs=1)
    assert not _external(optimized) and len(report.compressed) == 4


def test_progress_bar_shows_layers_and_running_ratio():
    stream = io.StringIO()
    bar = ProgressBar(stream, enabled=True)
    bar.start(2)
    bar.layer("w0", 10, 100)
    bar.layer("w1", 30, 100)
    bar.close()
    text = stream.getvalue()
    assert "1/2 layers, ratio 0.100" in text and "2/2 layers, ratio 0.200" in text and text.endswith("\n")


def test_progress_bar_is_silent_off_a_terminal():
    stream = io.StringIO()  # isatty() is False
    bar = ProgressBar(stream)
    bar.start(1)
    bar.layer("w0", 1, 2)
    bar.close()
    assert stream.getvalue() == ""


def test_progress_bar_is_driven_by_the_pass(source, tmp_path):
    path, _ = source
    stream = io.StringIO()
    bar = ProgressBar(stream, enabled=True)
    api.optimize_file(path, tmp_path / "o.onnx", tol=TOL, min_size=8, no_verify=True, jobs=2, progress=bar)
    assert "4/4 layers" in stream.getvalue()


def test_jobs_must_be_a_non_negative_integer():
    with pytest.raises(ConfigError, match="jobs must be an integer >= 0"):
        api.make_config(None, jobs=-1)
