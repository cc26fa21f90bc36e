"""compare: rows, bounds, files and exit codes on a small MLP and on Whisper's mel preprocessor."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper

from dehm_onnx.compare import ROW_KEYS, compare, markdown_table
from dehm_onnx.compare import methods as methods_module
from dehm_onnx.verify.calibration import generate_calibration
from models.fetch import WHISPER128, fetch_wheel_member
from tests.conftest import make_model, run_model, smooth_kernel

TOLS = (1e-3, 1e-2)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _mlp() -> onnx.ModelProto:
    """x -> MatMul(smooth 128x128) -> Relu -> MatMul(random 128x96): one compressible layer, one not."""
    rng = np.random.default_rng(7)
    w1 = smooth_kernel(128, 128)
    w2 = (rng.standard_normal((128, 96)) / np.sqrt(128)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
    ]
    return make_model(nodes, [("x", np.float32, [None, 128])], [("y", np.float32, [None, 96])], [("w1", w1), ("w2", w2)])


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("mlp") / "mlp.onnx"
    onnx.save(_mlp(), path)
    return path


@pytest.fixture(scope="module")
def mlp_result(mlp_path):
    return compare(mlp_path, tols=TOLS, rounds=3)


def _layer_bound(x: np.ndarray, w: np.ndarray, rel_weight_error: float) -> float:
    """``||X (W - W~)||_F / ||X W||_F <= ||X||_2 ||W - W~||_F / ||X W||_F``, plus float32 rounding."""
    x64, w64 = x.reshape(-1, w.shape[0]).astype(np.float64), w.astype(np.float64)
    if not np.any(x64):  # a zero sample (all of fc2's input cut by the Relu): both products are 0
        return 0.0
    exact = np.linalg.norm(x64 @ w64)
    rounding = 4 * w.shape[0] * np.finfo(np.float32).eps * np.linalg.norm(np.abs(x64) @ np.abs(w64))
    return float((np.linalg.norm(x64, 2) * rel_weight_error * np.linalg.norm(w64) + rounding) / exact)


def test_compare_rows_have_every_method_and_exactly_the_row_keys(mlp_result):
    expected = ["original"] + [f"{m}@{t:.0e}" for m in ("dehm", "svd", "pruning") for t in TOLS] + ["int8", "nbits4", "nbits8"]
    assert [r["method"] for r in mlp_result.rows] == expected
    assert not mlp_result.errors
    for row in mlp_result.rows:
        assert tuple(row) == ROW_KEYS
        assert all(row[k] is not None for k in ROW_KEYS)
        assert row["stored_params"] > 0 and row["file_bytes"] > 0 and row["latency_ms"] > 0


def test_compare_original_row_is_exact_and_quantizers_are_not(mlp_result):
    original = mlp_result.row("original")
    assert original["output_rel_error"] == 0.0 and original["max_layer_error"] == 0.0
    assert original["stored_params"] == 128 * 128 + 128 * 96
    assert original["optimize_seconds"] == 0.0
    for method in ("int8", "nbits4", "nbits8"):
        row = mlp_result.row(method)
        assert row["output_rel_error"] > 0 and row["max_layer_error"] > 0
        assert row["file_bytes"] < original["file_bytes"]
        assert row["output_cosine"] < 1.0 and row["output_max_abs"] > 0
    assert mlp_result.row("nbits4")["file_bytes"] < mlp_result.row("nbits8")["file_bytes"]
    assert mlp_result.row("nbits4")["file_bytes"] < mlp_result.row("int8")["file_bytes"]
    # 8-bit weights are more accurate than 4-bit ones
    assert mlp_result.row("nbits8")["output_rel_error"] < mlp_result.row("nbits4")["output_rel_error"]


def test_compare_certified_rows_meet_their_tol_per_layer(mlp_path, mlp_result):
    model = onnx.load(mlp_path)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    calib = generate_calibration(model, num_samples=16, seed=0)  # compare's default calibration set
    xs = [calib.arrays["x"][i] for i in range(calib.num_samples)]
    rs = [run_model(model, {"x": x}, ["r"])[0] for x in xs]
    # verify measures each layer on its worst sample: the bound is the largest per-sample bound.
    samples = {"fc1": [(x, weights["w1"]) for x in xs], "fc2": [(r, weights["w2"]) for r in rs]}
    for method in ("dehm", "svd"):
        for tol in TOLS:
            label = f"{method}@{tol:.0e}"
            certified = mlp_result.certified[label]
            assert "fc1" in certified, f"{label} left the smooth kernel dense"
            for layer, measured in mlp_result.layer_errors[label].items():
                rel_weight_error = certified.get(layer, 0.0)
                assert rel_weight_error <= tol
                bound = max(_layer_bound(x, w, rel_weight_error) for x, w in samples[layer])
                assert measured <= bound, (label, layer)
                if method == "dehm":  # optimize verified tol_out = tol on compare's calibration set
                    assert measured <= tol + 2 * np.sqrt(128) * np.finfo(np.float32).eps, (label, layer)
            assert mlp_result.row(label)["max_layer_error"] == max(mlp_result.layer_errors[label].values())
            assert mlp_result.row(label)["stored_params"] < mlp_result.row("original")["stored_params"]


def test_compare_pruning_counts_sparse_storage_and_keeps_a_dense_file(tmp_path):
    # A banded weight: pruning zeroes the band's tails, so CSR storage beats dense.
    i = np.arange(128)
    w = np.exp(-np.abs(i[:, None] - i[None, :]) / 2.0).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="band")
    model = make_model([node], [("x", np.float32, [None, 128])], [("y", np.float32, [None, 128])], [("w", w)])
    path = tmp_path / "band.onnx"
    onnx.save(model, path)
    result = compare(path, tols=[1e-2], methods=["original", "pruning"], rounds=1, workdir=tmp_path / "keep")
    pruned = onnx.numpy_helper.to_array(onnx.load(result.models["pruning@1e-02"]).graph.initializer[0])
    nonzeros = int(np.count_nonzero(pruned))
    assert 0 < nonzeros < w.size
    row = result.row("pruning@1e-02")
    assert row["stored_params"] == 2 * nonzeros + 128 + 1
    assert row["file_bytes"] >= result.row("original")["file_bytes"] * 0.99  # still stored dense
    assert np.linalg.norm(pruned - w) <= 1e-2 * np.linalg.norm(w)
    assert 0 < row["max_layer_error"]


def test_compare_failing_method_is_a_row_with_its_error(mlp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("quantizer cannot handle this model")

    monkeypatch.setitem(methods_module.BUILDERS, "nbits4", broken)
    result = compare(mlp_path, tols=[1e-2], methods=["original", "int4"], rounds=1)  # int4: old name of nbits4
    row = result.row("nbits4")
    assert tuple(row) == ROW_KEYS and row["stored_params"] is None and row["output_rel_error"] is None
    assert row["pareto"] is None and result.row("original")["pareto"] is True
    assert "quantizer cannot handle this model" in result.errors["nbits4"]
    assert "nbits4 failed: RuntimeError" in markdown_table(result)
    assert result.to_dict()["errors"] == {"nbits4": result.errors["nbits4"]}


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dehm_onnx", "compare", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_compare_cli_writes_json_markdown_and_png(mlp_path, tmp_path):
    out_json, out_md, out_png = tmp_path / "rows.json", tmp_path / "rows.md", tmp_path / "plot.png"
    proc = _cli(mlp_path, "--tol", "1e-2", "--rounds", "2", "--num-samples", "4", "--json", out_json, "--report", out_md, "--plot", out_png)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["method"] for r in rows] == ["original", "dehm@1e-02", "svd@1e-02", "pruning@1e-02", "int8", "nbits4", "nbits8"]
    assert all(list(r) == list(ROW_KEYS) for r in rows)
    text = out_md.read_text()
    assert "| method | stored params |" in text and "| dehm@1e-02 |" in text
    assert proc.stdout.strip().splitlines()[0].startswith("| method |")
    assert out_png.read_bytes()[:8] == PNG_SIGNATURE and out_png.stat().st_size > 10_000


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.onnx"], "does not exist"),
        (["{mlp}", "--tol", "1.5"], "tol must be in (0, 1)"),
        (["{mlp}", "--method", "int2"], "invalid choice"),
        (["{mlp}", "--accuracy-level", "7"], "invalid choice"),
        (["{mlp}", "--emit", "dense"], "invalid choice"),
        (["{mlp}", "--calibration", "nothere.npz"], "cannot read calibration file"),
        (["{text}"], "not a readable ONNX model"),
        (["{unrunnable}"], "onnxruntime cannot load the model"),
    ],
)
def test_compare_cli_bad_input_exits_2_with_one_line(args, message, mlp_path, tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("not a model")
    unrunnable = tmp_path / "unknown_op.onnx"  # valid ONNX, but no runtime has this op
    node = helper.make_node("Mystery", ["x"], ["y"], domain="example.unknown")
    model = helper.make_model(
        helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [1, 4])], [helper.make_tensor_value_info("y", 1, [1, 4])]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.unknown", 1)], ir_version=10)
    onnx.save(model, unrunnable)
    args = [a.format(mlp=mlp_path, text=text, unrunnable=unrunnable) for a in args]
    proc = _cli(*args, "--json", tmp_path / "out.json", cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.json").exists()


def test_compare_whisper128_mel_filterbank(tmp_path):
    path = fetch_wheel_member(*WHISPER128)
    result = compare(
        path,
        tols=[1e-3],
        methods=["original", "dehm", "int8"],  # every run pads to 30 s of audio: keep them few
        input_shapes=["waveforms=1x16000"],
        input_ranges=["waveforms_lens=16000:16000"],
        num_samples=2,
        rounds=1,
    )
    assert not result.errors
    assert result.row("original")["output_rel_error"] == 0.0
    dehm = result.row("dehm@1e-03")
    assert all(e <= 1e-3 for e in result.certified["dehm@1e-03"].values()) and result.certified["dehm@1e-03"]
    # The banded filterbank: the H-matrix stores less than the dense 201 x 128 weight.
    assert dehm["stored_params"] < result.row("original")["stored_params"]
    assert result.row("int8")["max_layer_error"] > 0


def test_compare_quantizers_reach_gemm_weights(tmp_path, rng):
    # onnxruntime's quantizers handle MatMul only; compare rewrites plain Gemms first.
    w = rng.standard_normal((96, 128)).astype(np.float32)  # transB=1: W is stored as (out, in)
    bias = rng.standard_normal(96).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="dense", transB=1)
    model = make_model([node], [("x", np.float32, [None, 128])], [("y", np.float32, [None, 96])], [("w", w), ("b", bias)])
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert methods_module.gemm_as_matmul(rewritten) == 1
    assert [n.op_type for n in rewritten.graph.node] == ["MatMul", "Add"]
    x = rng.standard_normal((5, 128)).astype(np.float32)
    np.testing.assert_allclose(run_model(rewritten, {"x": x})[0], run_model(model, {"x": x})[0], rtol=1e-5, atol=1e-5)
    path = tmp_path / "gemm.onnx"
    onnx.save(model, path)
    result = compare(path, tols=[1e-2], methods=["original", "int8", "nbits4", "nbits8"], rounds=1)
    assert not result.errors
    for method in ("int8", "nbits4", "nbits8"):
        assert result.layer_errors[method]["dense"] > 0
        assert result.row(method)["file_bytes"] < result.row("original")["file_bytes"]


def test_compare_dehm_rows_with_function_emission(mlp_path):
    from dehm_onnx.config import make_config

    result = compare(mlp_path, tols=[1e-2], methods=["original", "dehm"], rounds=1, config=make_config(None, emit="function"))
    assert not result.errors
    row = result.row("dehm@1e-02")
    assert 0 < row["max_layer_error"] <= 1e-2 + 1e-5
    assert row["stored_params"] < result.row("original")["stored_params"]
