"""Quantized storage through the optimize pass: onnxruntime's fused kernel, load-time folding,
the opset upgrade, float64 weights, and bytes (never more than the input, ``max_ratio``)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import dehm_onnx
from dehm_onnx.hmatrix import Storage
from tests.conftest import make_model, output_bound, rel_fro, run_model, smooth_kernel


def _gemm(w: np.ndarray, bias: bool = True, opset: int = 17) -> onnx.ModelProto:
    """``y = x @ w (+ b)`` as a Gemm (the form exporters write for nn.Linear)."""
    m, n = w.shape
    inits = [("w", w)] + ([("b", np.linspace(-1, 1, n).astype(w.dtype))] if bias else [])
    node = helper.make_node("Gemm", ["x", "w"] + (["b"] if bias else []), ["y"], name="fc")
    return make_model([node], [("x", w.dtype, ["B", m])], [("y", w.dtype, ["B", n])], inits, opset=opset)


def _session_ops(model: onnx.ModelProto, tmp_path) -> collections.Counter:
    """Op types of the graph onnxruntime runs after its optimizations (default options)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "session.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(tmp_path / "session.onnx").graph.node)


def _initializer_types(model: onnx.ModelProto) -> set[int]:
    return {t.data_type for t in model.graph.initializer if t.data_type != TensorProto.INT64}


def test_integer_blocks_run_on_onnxruntimes_quantized_kernel(rng, tmp_path):
    """A weight without structure at tol 0.1: int4 blocks, fused into MatMulNBits (bias too)."""
    w = rng.standard_normal((256, 192)).astype(np.float32)
    model = _gemm(w)
    out, report = dehm_onnx.optimize(model, tol=0.1, tol_out=0.12, min_size=8)
    (record,) = report.layers
    assert record.compressed and "int4" in record.precision and record.byte_ratio < 0.2
    assert TensorProto.INT4 in _initializer_types(out) and out.opset_import[0].version == 21
    ops = _session_ops(out, tmp_path)
    assert ops["MatMulNBits"] >= 1 and "DequantizeLinear" not in ops, ops
    x = rng.standard_normal((8, 256)).astype(np.float32)
    # Weight error <= 0.1 plus the kernel's 8-bit activations (about 5e-3).
    assert rel_fro(run_model(out, {"x": x})[0], run_model(model, {"x": x})[0]) < 0.11


def test_tight_output_bound_dequantizes_integers_at_load(rng, tmp_path):
    """No room for the kernel's activation error: integers are dequantized at load (exact)."""
    w = rng.standard_normal((256, 192)).astype(np.float32)
    out, report = dehm_onnx.optimize(_gemm(w), tol=0.1, tol_out=5e-3, no_verify=True, min_size=8)
    assert "int4" in report.layers[0].precision
    ops = _session_ops(out, tmp_path)
    assert "MatMulNBits" not in ops and "DequantizeLinear" not in ops and "Cast" not in ops, ops


def test_precision_int8_fuses_whatever_the_bound(rng, tmp_path):
    w = rng.standard_normal((128, 128)).astype(np.float32)
    out, report = dehm_onnx.optimize(_gemm(w, bias=False), tol=2e-2, tol_out=0.05, precision="int8", min_size=8)
    assert "int8" in report.layers[0].precision and "int4" not in report.layers[0].precision
    assert _session_ops(out, tmp_path)["MatMulNBits"] >= 1


def test_float16_storage_is_folded_at_load(rng, tmp_path):
    """Default tol 1e-3 on a weight without structure: float16 in the file (half the bytes),
    one float32 constant in memory once the session has folded the Cast."""
    w = rng.standard_normal((96, 80)).astype(np.float32)
    out, report = dehm_onnx.optimize(_gemm(w), min_size=8)
    assert report.layers[0].precision == "dense fp16 x1" and report.layers[0].byte_ratio == 0.5
    assert _initializer_types(out) == {TensorProto.FLOAT16, TensorProto.FLOAT}  # weight, bias
    ops = _session_ops(out, tmp_path)
    assert "Cast" not in ops and ops.keys() <= {"MatMul", "Gemm", "Sum", "Add"}, ops


def test_opset_is_raised_for_integers_and_outputs_stay(rng):
    model = _gemm(smooth_kernel(160, 128) + 0.01 * rng.standard_normal((160, 128)).astype(np.float32), opset=13)
    out, report = dehm_onnx.optimize(model, tol=0.05, min_size=8, no_verify=True)
    assert any(s in report.layers[0].precision for s in ("int8", "int4"))
    assert [(o.domain, o.version) for o in out.opset_import] == [("", 21)] and out.ir_version >= 10
    assert any("opset raised from 13 to 21" in note for note in report.notes)
    # the converter's shape inference leaves no trace: declared types kept, none added
    assert [o.type for o in out.graph.output] == [o.type for o in model.graph.output]
    assert not [v for v in out.graph.value_info if not v.name.startswith("w.hm")]
    onnx.checker.check_model(out, full_check=True)
    x = rng.standard_normal((4, 160)).astype(np.float32)
    assert rel_fro(run_model(out, {"x": x})[0], run_model(model, {"x": x})[0]) < 0.06


def test_opset_kept_when_the_converter_fails(rng, monkeypatch):
    """The model keeps its opset: int4 arrays become int8 and integers are folded at load."""

    def refuse(model, version):
        raise RuntimeError("no adapter")

    monkeypatch.setattr(onnx.version_converter, "convert_version", refuse)
    w = rng.standard_normal((128, 128)).astype(np.float32)
    model = _gemm(w)
    out, report = dehm_onnx.optimize(model, tol=0.1, min_size=8, no_verify=True)
    assert "int4" in report.layers[0].precision
    assert out.opset_import[0].version == 17
    assert any("could not raise opset 17 to 21" in note and "no adapter" in note for note in report.notes)
    assert TensorProto.INT4 not in _initializer_types(out) and TensorProto.INT8 in _initializer_types(out)
    assert "DequantizeLinear" not in {n.op_type for n in out.graph.node}
    x = rng.standard_normal((4, 128)).astype(np.float32)
    assert rel_fro(run_model(out, {"x": x})[0], run_model(model, {"x": x})[0]) < 0.1


def test_float64_weight_with_integer_precision_is_dequantized_exactly(rng):
    """DequantizeLinear has no float64 output: float64 layers keep integers folded at load."""
    w = rng.standard_normal((128, 96))
    model = _gemm(w)
    out, report = dehm_onnx.optimize(model, tol=0.1, tol_out=0.12, precision="int4", min_size=8)
    (record,) = report.layers
    assert record.compressed and "int4" in record.precision and record.byte_ratio < 0.2
    assert "DequantizeLinear" not in {n.op_type for n in out.graph.node}
    assert any("'fc' (float64): integer arrays dequantized" in note for note in report.notes), report.notes
    x = rng.standard_normal((4, 128))
    y, y0 = run_model(out, {"x": x})[0], run_model(model, {"x": x})[0]
    assert y.dtype == np.float64 and rel_fro(y, y0) <= output_bound(x, w, record.rel_certified_error, np.float64)


@pytest.mark.parametrize("size", [48, 256])
def test_never_more_bytes_than_the_input(rng, size):
    """Gaussian weights in float at tol 0.1 save a few blocks at most; with the new nodes'
    protobuf the file must still not grow (at 48 x 48 the layer is left as it was)."""
    w = rng.standard_normal((size, size)).astype(np.float32)
    model = _gemm(w, bias=False)
    _, report = dehm_onnx.optimize(model, tol=0.1, precision="float", min_size=8, no_verify=True)
    assert report.bytes_after <= report.bytes_before
    if size == 48:
        assert report.layers[0].skip_reason == "NOT_SMALLER"
    # The bytes of the engine's choice (verification may tighten a layer on its worst sample).
    _, report = dehm_onnx.optimize(model, tol=0.1, min_size=8, no_verify=True)
    assert report.bytes_after <= (0.25 if size == 48 else 0.15) * report.bytes_before  # int4 (and protobuf)


def test_max_ratio_compares_bytes(rng):
    model = _gemm(smooth_kernel(128, 128), bias=False)
    _, report = dehm_onnx.optimize(model, min_size=8)
    ratio = report.layers[0].byte_ratio
    assert 0 < ratio < 1
    _, report = dehm_onnx.optimize(model, min_size=8, max_ratio=ratio * 0.99)
    assert report.layers[0].skip_reason == "LITTLE_GAIN" and "bytes" in report.layers[0].reason


@pytest.mark.parametrize("precision, allowed", [
    ("float", {"float"}), ("fp16", {"float", "fp16"}), ("int8", {"float", "fp16", "int8"}),
])
def test_precision_restricts_the_storages(rng, precision, allowed):
    model = _gemm(smooth_kernel(128, 128) + 1e-3 * rng.standard_normal((128, 128)).astype(np.float32), bias=False)
    _, report = dehm_onnx.optimize(model, tol=2e-2, precision=precision, min_size=8, no_verify=True)
    used = {s for part in report.layers[0].precision.split(", ") for s in part.split(" ")[1].split("+")}
    assert used <= allowed


def test_weight_with_tiny_values_keeps_a_storage_that_holds_them(rng):
    """Values below float16's range: integer scales would be 0, float16 values 0 — the engine
    keeps a storage whose error it measured, and the output stays within the bound."""
    w = (rng.standard_normal((96, 96)) * 1e-30).astype(np.float32)
    model = _gemm(w, bias=False)
    out, report = dehm_onnx.optimize(model, tol=0.1, min_size=8, no_verify=True)
    (record,) = report.layers
    assert not record.compressed or ("fp16" not in record.precision)
    x = rng.standard_normal((3, 96)).astype(np.float32)
    y, y0 = run_model(out, {"x": x})[0], run_model(model, {"x": x})[0]
    assert np.all(np.isfinite(y)) and rel_fro(y, y0) < 0.11


def test_storage_enum_labels_match_the_report():
    assert [s.label for s in Storage] == ["float", "fp16", "int8", "int4"]


def test_function_mode_takes_every_storage():
    """The function mode writes layout v2 (decoded by its body) for smaller storages, as custom does."""
    for emit in ("function", "custom"):
        assert dehm_onnx.OptimizeConfig(emit=emit, precision="int4").engine_precision == "int4"
        assert dehm_onnx.OptimizeConfig(emit=emit).engine_precision == "auto"


@pytest.mark.parametrize("precision", ["auto", "float"])
def test_function_mode_writes_the_storage_it_planned(rng, precision):
    """The bytes the engine planned are the bytes the function mode writes: layout v2 keeps
    float16 and integer arrays (``auto``), layout v1 float ones."""
    model = _gemm(smooth_kernel(160, 128), bias=False)
    out, report = dehm_onnx.optimize(model, emit="function", tol=1e-2, min_size=8, precision=precision)
    (record,) = report.layers
    assert record.compressed and record.emit == "function"
    storages = {s for part in record.precision.split(", ") for s in part.split(" ")[1].split("+")}
    assert (storages == {"float"}) == (precision == "float")
    (node,) = [n for n in out.graph.node if n.op_type == "HMatMul"]
    data = next(t for t in out.graph.initializer if t.name == node.input[1])
    assert data.data_type == (onnx.TensorProto.FLOAT if precision == "float" else onnx.TensorProto.UINT8)
    assert 0 < record.byte_ratio < 1
    x = rng.standard_normal((4, 160)).astype(np.float32)
    y, y0 = run_model(out, {"x": x})[0], run_model(model, {"x": x})[0]
    assert rel_fro(y, y0) <= output_bound(x, smooth_kernel(160, 128), record.rel_certified_error)


@pytest.mark.parametrize("emit", ["auto", "function", "custom"])
@pytest.mark.parametrize("size,tol", [(16, 1e-3), (16, 1e-2), (24, 1e-3), (64, 1e-2)])
def test_no_emit_mode_writes_more_bytes_than_the_input(emit, size, tol):
    """Small layers, where nodes and function bodies cost about as much as the weights: the
    byte check counts their serialized protobuf, so the file never grows (with 120 bytes a
    node and no function bodies counted, 16 x 16 grew to 1.2-1.9x in every mode)."""
    model = _gemm(smooth_kernel(size, size), bias=False)
    _, report = dehm_onnx.optimize(model, emit=emit, tol=tol, min_size=8, no_verify=True)
    assert report.bytes_after <= report.bytes_before, report.to_table()


@pytest.mark.parametrize("emit", ["auto", "function", "custom"])
@pytest.mark.parametrize("size,tol", [(16, 1e-2), (20, 1e-3), (24, 1e-2), (48, 1e-3)])
def test_shared_weight_never_grows_the_file(emit, size, tol):
    """Two MatMuls read one weight: its tensors are stored once, its nodes and metadata once
    per user (counted for the first user only, 20 x 20 and 24 x 24 grew by up to 1.5x)."""
    w = smooth_kernel(size, size)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="a"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w"], ["y"], name="b")]
    model = make_model(nodes, [("x", np.float32, ["B", size])], [("y", np.float32, ["B", size])], [("w", w)])
    _, report = dehm_onnx.optimize(model, emit=emit, tol=tol, min_size=8, no_verify=True)
    assert report.bytes_after <= report.bytes_before, report.to_table()


def test_small_layers_keep_the_precision_whose_emission_is_smaller(monkeypatch):
    """On small weights the pass also compresses in float16 only and keeps whichever standard-op
    emission takes fewer bytes: the default file is no larger than either form alone."""
    from dehm_onnx.graph import rewrite
    from models import make_demo

    model = make_demo.build()

    def file_bytes(**options) -> int:
        out, report = dehm_onnx.optimize(model, no_verify=True, **options)
        assert all(r.compressed for r in report.layers)
        return len(out.SerializeToString())

    default = file_bytes()
    fp16 = file_bytes(precision="fp16")
    monkeypatch.setattr(rewrite, "SMALL_WEIGHT_ELEMENTS", 0)  # the engine's mixed precision alone
    mixed = file_bytes()
    assert default <= min(fp16, mixed) and default < max(fp16, mixed), (default, fp16, mixed)


@pytest.mark.parametrize("emit", ["custom", "function"])
def test_packed_modes_store_float16_scales(emit):
    """``custom`` and ``function`` keep a float32 weight's integer scales in float16 (half the
    bytes; their kernels and decoders read them) and stay within the certified bound. (Standard
    ops keep the activation's dtype, the form onnxruntime fuses into ``MatMulNBits``.)"""
    from onnx import numpy_helper

    from dehm_onnx.hmatrix.pack import FORMATS, Elem, decode_format
    from dehm_onnx.ops.library import make_session

    w = smooth_kernel(256, 192)
    out, report = dehm_onnx.optimize(_gemm(w, bias=False), tol=1e-2, emit=emit, precision="int8", no_verify=True)
    (record,) = report.layers
    assert record.compressed and "int8" in record.precision
    x = np.random.default_rng(3).standard_normal((4, 256)).astype(np.float32)
    runs = [make_session(out).run(None, {"x": x})[0]] + ([run_model(out, {"x": x})[0]] if emit == "function" else [])
    for y in runs:  # the kernel, and for function files also the body on stock onnxruntime
        assert rel_fro(y, x.astype(np.float64) @ w) <= output_bound(x, w, record.rel_certified_error, np.float32)
    layout = next(numpy_helper.to_array(t) for t in out.graph.initializer if t.data_type == TensorProto.INT64 and len(t.dims) == 2 and t.dims[1] == 8)
    codes = [c for row in layout[1:] for c in (row[FORMATS] % 65536, row[FORMATS] // 65536) if c]
    ints = [decode_format(int(c)) for c in codes if decode_format(int(c))[0] in (Elem.INT8, Elem.INT4)]
    assert ints and all(scale == Elem.FLOAT16 for _, scale, _ in ints)
