"""onnxruntime's quantizers as compare baselines; dehm and MatMulNBits variants; the JSON document."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from dehm_onnx.compare import JSON_KEYS, ROW_KEYS, compare, pareto_table, plan_rows, write_json
from dehm_onnx.compare.measure import file_bytes
from dehm_onnx.compare.methods import nbits_quantize
from dehm_onnx.config import OptimizeConfig
from dehm_onnx.errors import ConfigError
from tests.conftest import make_model, smooth_kernel

K, N = 128, 96


def _layer(rng) -> onnx.ModelProto:
    """x [1, 128] -> MatMul(smooth 128 x 96): compressible by dehm, quantizable by onnxruntime."""
    w = smooth_kernel(K, N)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="layer")
    return make_model([node], [("x", np.float32, [1, K])], [("y", np.float32, [1, N])], [("w", w)])


def _stock_session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits", [4, 8])
def test_nbits_quantize_writes_matmulnbits_that_onnxruntime_runs(rng, tmp_path, bits):
    model = _layer(rng)
    before = model.SerializeToString()
    quantized = nbits_quantize(model, bits)
    assert model.SerializeToString() == before  # the input is not touched
    nodes = [n for n in quantized.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 1
    attrs = {a.name: a.i for a in nodes[0].attribute}
    assert attrs["bits"] == bits and attrs["block_size"] == 32 and "accuracy_level" not in attrs  # the quantizer's default
    path = tmp_path / "q.onnx"
    onnx.save(quantized, path)
    x = rng.standard_normal((1, K)).astype(np.float32)
    w = onnx.numpy_helper.to_array(model.graph.initializer[0])
    (y,) = _stock_session(path).run(None, {"x": x})
    error = np.linalg.norm(y - x @ w) / np.linalg.norm(x @ w)
    assert 0 < error < (0.2 if bits == 4 else 2e-2)


def test_compare_counts_bytes_from_the_files_including_external_data(rng, tmp_path):
    path = tmp_path / "layer.onnx"
    onnx.save(_layer(rng), path, save_as_external_data=True, location="layer.onnx.data", size_threshold=0)
    assert (tmp_path / "layer.onnx.data").stat().st_size >= K * N * 4
    result = compare(path, tols=[1e-2], methods=["original", "nbits8"], rounds=1, workdir=tmp_path / "keep")
    assert not result.errors
    original = result.row("original")
    on_disk = path.stat().st_size + (tmp_path / "layer.onnx.data").stat().st_size
    assert original["file_bytes"] == on_disk and original["file_ratio"] == 1.0
    nbits8 = result.row("nbits8")
    assert nbits8["file_bytes"] == file_bytes(result.models["nbits8"])
    written = sorted((tmp_path / "keep").glob("nbits8*"))
    assert nbits8["file_bytes"] == sum(f.stat().st_size for f in written)
    assert nbits8["file_ratio"] == pytest.approx(nbits8["file_bytes"] / on_disk)
    # int8 weights plus scales: about a quarter of the float32 weight
    assert 0.2 < nbits8["file_ratio"] < 0.5


def test_compare_accuracy_levels_are_rows_and_stock_kernels_say_which_ran(rng, tmp_path):
    path = tmp_path / "layer.onnx"
    onnx.save(_layer(rng), path)
    result = compare(path, tols=[1e-2], methods=["original", "nbits8"], accuracy_levels=[None, 4], rounds=1)
    assert [r["method"] for r in result.rows] == ["original", "nbits8", "nbits8-acc4"]
    assert result.kernels["original"] == "MatMul x1"
    assert result.kernels["nbits8"] == "MatMulNBits(bits=8, accuracy_level=0) x1"
    assert result.kernels["nbits8-acc4"] == "MatMulNBits(bits=8, accuracy_level=4) x1"
    # level 4 quantizes the activations too: never more accurate than float32 arithmetic
    assert result.row("nbits8-acc4")["output_rel_error"] >= result.row("nbits8")["output_rel_error"] * 0.9


def test_plan_rows_labels_dehm_and_nbits_variants():
    specs = plan_rows([1e-3, 1e-2], ["dehm", "nbits4", "int8"], emits=["ops", "function"], accuracy_levels=[None, 4])
    assert [s.label for s in specs] == [
        "dehm-ops@1e-03", "dehm-ops@1e-02", "dehm-function@1e-03", "dehm-function@1e-02",
        "int8", "nbits4", "nbits4-acc4",
    ]
    assert [s.label for s in plan_rows([1e-2], ["dehm", "nbits8"])] == ["dehm@1e-02", "nbits8"]
    with pytest.raises(ConfigError, match="accuracy_level"):
        plan_rows([1e-2], ["nbits8"], accuracy_levels=[5])
    with pytest.raises(ConfigError, match="emit"):
        plan_rows([1e-2], ["dehm"], emits=["dense"])


def test_plan_rows_dehm_precision_is_passed_to_optimize_when_it_has_the_option():
    if "precision" in {f.name for f in dataclasses.fields(OptimizeConfig)}:
        specs = plan_rows([1e-2], ["dehm"], precisions=["float", "int8"])
        assert [s.label for s in specs] == ["dehm-float@1e-02", "dehm-int8@1e-02"]
        assert specs[1].dehm_overrides() == {"precision": "int8"}
    else:  # the hook waits for the quantized emission: refused before any work
        with pytest.raises(ConfigError, match="precision"):
            plan_rows([1e-2], ["dehm"], precisions=["int8"])


def test_plan_rows_pair_every_precision_with_every_emit_mode():
    specs = plan_rows([1e-2], ["dehm"], precisions=["float", "int8"], emits=["ops", "function"])
    assert [(s.precision, s.emit) for s in specs] == [
        ("float", "ops"), ("float", "function"), ("int8", "ops"), ("int8", "function")]
    with pytest.raises(ConfigError, match="precision"):
        plan_rows([1e-2], ["dehm"], precisions=["int3"], emits=["ops"])


def test_compare_json_has_its_keys_and_pareto_flags(rng, tmp_path):
    path = tmp_path / "layer.onnx"
    onnx.save(_layer(rng), path)
    result = compare(path, tols=[1e-2], methods=["original", "dehm", "nbits4"], emits=["ops"], rounds=1)
    assert not result.errors
    out = tmp_path / "rows.json"
    write_json(result, out)
    document = json.loads(out.read_text())
    assert tuple(document) == tuple(k for k in JSON_KEYS if k != "errors")
    assert document["pareto_axes"] == ["file_bytes", "output_rel_error"]
    labels = ["original", "dehm-ops@1e-02", "nbits4"]
    assert [r["method"] for r in document["rows"]] == labels
    for row in document["rows"]:
        assert tuple(row) == ROW_KEYS and isinstance(row["pareto"], bool)
    assert list(document["outputs"]) == labels and list(document["kernels"]) == labels
    for outputs in document["outputs"].values():
        assert [o["name"] for o in outputs] == ["y"] and all(set(o) == {"name", "rel_l2", "max_abs", "cosine"} for o in outputs)
    rows = {r["method"]: r for r in document["rows"]}
    # the original is exact: on the front; dehm compresses the smooth kernel below its bound
    assert rows["original"]["pareto"] and rows["dehm-ops@1e-02"]["file_ratio"] < 1
    assert rows["dehm-ops@1e-02"]["output_rel_error"] <= 1e-2 + 1e-5
    assert "HMatMul" not in document["kernels"]["dehm-ops@1e-02"]  # standard ops only
    table = pareto_table(result, extra={"task": {"nbits4": "0.5"}})
    assert table.splitlines()[0].startswith("| method | file bytes (× original) |") and "| task |" in table
    assert "| nbits4 |" in table and "| 0.5 |" in table


def test_summarize_kernels_counts_products_nbits_levels_and_dehm_nodes():
    from dehm_onnx.compare.measure import summarize_kernels
    from dehm_onnx.ops.hmatmul import DOMAIN

    nodes = [
        helper.make_node("MatMulNBits", ["x", "b", "s"], ["y1"], domain="com.microsoft", bits=8, block_size=32, K=4, N=4),
        helper.make_node("MatMulNBits", ["x", "b", "s"], ["y2"], domain="com.microsoft", bits=4, block_size=32, K=4, N=4, accuracy_level=4),
        helper.make_node("HMatMulV2", ["x"], ["y3"], domain=DOMAIN),  # any version of dehm's op
        helper.make_node("MatMul", ["x", "w"], ["y4"]),
        helper.make_node("Relu", ["y4"], ["y5"]),  # not a product: not listed
    ]
    graph = helper.make_graph(nodes, "g", [], [])
    assert summarize_kernels(helper.make_model(graph)) == {
        "MatMulNBits(bits=8, accuracy_level=0)": 1,
        "MatMulNBits(bits=4, accuracy_level=4)": 1,
        "HMatMulV2": 1,
        "MatMul": 1,
    }
