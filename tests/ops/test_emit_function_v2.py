"""``--emit function`` with quantized storage: layout-v2 inputs, decoded by ``ai.dehm.Decode*``.

Stock onnxruntime (no library) must give ``unpack``'s values bit for bit from the decoders,
fold every decoder at session creation, and run the body to the conformance tolerance; the
library runs the v2 kernel on the same file. The file stores the packed bytes once.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hmatmul_cases import CASES, CASES_V2, Case
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from test_hmatmul_cases import assert_matches
from test_hmatmul_v2_properties import cases

import dehm_onnx
from dehm_onnx.graph import decode
from dehm_onnx.graph.emit import EmitContext, layer_model
from dehm_onnx.graph.emit_function import as_float, fit_function_to_model
from dehm_onnx.hmatrix import GROUP_SIZES, Block, BlockKind, HMatrix, Storage, StoredArray, compress, pack, unpack
from dehm_onnx.hmatrix.pack import array_locations
from dehm_onnx.ops import hmatmul
from dehm_onnx.ops.library import make_session

# Ops that only the decoders use: none may survive onnxruntime's constant folding.
DECODING_OPS = {"Mod", "Div", "Range", "Pow", "Where"}

FLOAT16_SPECIALS = [0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x7BFF, 0xFBFF, 0x3C00]
FLOAT32_SPECIALS = [0x00000000, 0x80000000, 0x00000001, 0x807FFFFF, 0x00800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x3F800000]


def _bits(bits: int, exponent_bits: int, mantissa_bits: int) -> st.SearchStrategy:
    """Finite IEEE bit patterns (never exponent all ones), the special values more often."""
    full = (1 << exponent_bits) - 1
    specials = FLOAT16_SPECIALS if bits == 16 else FLOAT32_SPECIALS
    finite = st.integers(0, (1 << bits) - 1).filter(lambda v: (v >> mantissa_bits) & full != full)
    return st.one_of(st.sampled_from(specials), finite)


def _floats(draw, shape, dtype) -> np.ndarray:
    bits, exponent, mantissa, view = (16, 5, 10, np.uint16) if dtype == np.float16 else (32, 8, 23, np.uint32)
    values = draw(st.lists(_bits(bits, exponent, mantissa), min_size=shape[0] * shape[1], max_size=shape[0] * shape[1]))
    return np.array(values, dtype=view).view(dtype).reshape(shape)


@st.composite
def stored_arrays(draw, k: int):
    """One ``k``-row array in any layout-v2 format, from raw bit patterns and integer ranges."""
    n = draw(st.integers(1, 6))
    storage = draw(st.sampled_from((Storage.FLOAT, Storage.FP16, Storage.INT8, Storage.INT4)))
    if storage == Storage.FLOAT:
        return StoredArray(storage, _floats(draw, (k, n), np.float32))
    if storage == Storage.FP16:
        return StoredArray(storage, _floats(draw, (k, n), np.float16))
    low, high = (-127, 127) if storage == Storage.INT8 else (-8, 7)
    group = draw(st.sampled_from(GROUP_SIZES))
    q = np.array(draw(st.lists(st.integers(low, high), min_size=k * n, max_size=k * n)), np.int8).reshape(k, n)
    scales = _floats(draw, (-(-k // group), n), draw(st.sampled_from((np.float32, np.float16))))
    return StoredArray(storage, q, scales, group)


def _decoder_model(packed) -> onnx.ModelProto:
    """Every array of a v2 ``packed``, built by ``decode.PackedArrays``, as graph outputs."""
    data = ir.Value(name="data", const_value=ir.tensor(packed.data, name="data"))
    nodes: list[ir.Node] = []
    arrays = decode.PackedArrays(data, array_locations(packed), 17, nodes)
    outputs = []
    for i, where in enumerate(array_locations(packed)):
        out = ir.Value(name=f"A{i}", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(list(where.shape)))
        nodes.append(ir.node("Identity", [arrays.value(where)], outputs=[out]))
        outputs.append(out)
    graph = ir.Graph([], outputs, nodes=nodes, initializers=[data], opset_imports={"": 17, hmatmul.DOMAIN: 1}, name="decode")
    model = ir.Model(graph, ir_version=10)
    for function in decode.decoder_functions(arrays.decoders):
        fit_function_to_model(model, function)
        model.functions[function.identifier()] = function
    return ir.serde.serialize_model(model)


def _stock(model: onnx.ModelProto, tmp_path):
    """A stock CPU session (no library) and the graph onnxruntime optimized it into."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session, onnx.load(options.optimized_model_filepath)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40).flatmap(lambda k: st.lists(stored_arrays(k), min_size=1, max_size=4)))
def test_decoders_equal_unpack_bit_for_bit(tmp_path_factory, arrays):
    """The decoders and ``PackedArrays``, run by stock onnxruntime, give ``unpack``'s float32
    values bit for bit (float16 subnormals and signed zeros, float32 subnormals, int8, int4
    nibbles, float16 and float32 scales, arrays of several element types decoded from one
    buffer), and onnxruntime folds all of it when the session is created."""
    k = arrays[0].shape[0]
    blocks, c0 = [], 0
    with np.errstate(over="ignore"):  # float16 scales times 127 may overflow: inf on both sides
        for a in arrays:
            blocks.append(Block(BlockKind.DENSE, 0, k, c0, c0 + a.shape[1], storage=(a,)))
            c0 += a.shape[1]
        packed = pack(HMatrix((k, c0), np.dtype(np.float32), tuple(blocks), 1.0, 0.0, 0.1), version=2)
        expected = [a.dequantized().astype(np.float32) for b in unpack(packed).blocks for a in b.storage]
    model = _decoder_model(packed)
    onnx.checker.check_model(model, full_check=True)
    session, optimized = _stock(model, tmp_path_factory.mktemp("decode"))
    got = session.run(None, {})
    assert len(got) == len(expected)
    for y, e in zip(got, expected):
        assert y.dtype == np.float32 and y.shape == e.shape
        np.testing.assert_array_equal(y.view(np.uint32), e.view(np.uint32))
    assert not optimized.graph.node, f"not folded: {[n.op_type for n in optimized.graph.node]}"


def _check_folded(optimized: onnx.ModelProto) -> None:
    """No decoder call and no decoding op is left; the packed bytes are gone from the graph."""
    ops = {n.op_type for n in optimized.graph.node}
    assert not ops & DECODING_OPS, f"decoding left unfolded: {sorted(ops & DECODING_OPS)}"
    assert not any(n.domain == hmatmul.DOMAIN for n in optimized.graph.node)
    assert not optimized.functions
    assert not any(t.data_type == TensorProto.UINT8 for t in optimized.graph.initializer)


def _function_model(case) -> onnx.ModelProto:
    lead = [f"d{i}" for i in range(case.x.ndim - 1)]
    model = layer_model(case.hm, "function", [*lead, case.hm.shape[0]], case.x.dtype, "layer.w.hm")
    onnx.checker.check_model(model, full_check=True)
    return model


def _initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def _body_float_values(model: onnx.ModelProto) -> int:
    """Nonzero float values held by ``Constant`` nodes of the HMatMul bodies (weights copied)."""
    bodies = [f for f in model.functions if f.name == hmatmul.OP_TYPE]
    return sum(int(np.count_nonzero(numpy_helper.to_array(a.t))) for f in bodies for n in f.node
               for a in n.attribute if a.name == "value" and a.t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16))


def _assert_stored_once(model: onnx.ModelProto, hm) -> None:
    """The initializers are exactly the custom v2 file's packed arrays; bodies copy no weight."""
    custom = layer_model(hm, "custom", ["b", hm.shape[0]], np.float32, "layer.w.hm")
    by_name = {t.name: numpy_helper.to_array(t) for t in custom.graph.initializer}
    for t in model.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(t), by_name[t.name])
    assert _initializer_bytes(model) == _initializer_bytes(custom)
    assert _body_float_values(model) == 0


@pytest.mark.parametrize("case", CASES_V2, ids=[c.name for c in CASES_V2])
def test_function_v2_runs_stock_and_with_the_library(case, tmp_path):
    model = _function_model(case)
    (node,) = [n for n in model.graph.node if n.domain == hmatmul.DOMAIN]
    data = next(t for t in model.graph.initializer if t.name == node.input[1])
    assert data.data_type == TensorProto.UINT8
    names = sorted(f.name for f in model.functions if f.name != hmatmul.OP_TYPE)
    assert names and set(names) <= set(decode.DECODER_NAMES) and len(set(names)) == len(names)
    _assert_stored_once(model, case.hm)
    session, optimized = _stock(model, tmp_path)
    assert_matches(case, session.run(None, {"X": case.x})[0])
    _check_folded(optimized)
    assert_matches(case, make_session(model).run(None, {"X": case.x})[0])


@pytest.mark.parametrize("opset", [11, 12, 13, 21])
@pytest.mark.parametrize("name", ["q_mixed_tiers_permuted", "tall_row_perm"])
def test_function_at_every_opset(name, opset, tmp_path):
    """Layout v2 (``q_mixed_tiers_permuted``) and v1 (``tall_row_perm``, float): before opset
    12 ``Constant`` has no ``value_int(s)`` (the body and decoders use tensors), before 13
    ``Split`` takes its sizes as an attribute, before 14 the body is per block."""
    case = next(c for c in CASES_V2 + CASES if c.name == name)
    lead = [f"d{i}" for i in range(case.x.ndim - 1)]
    model = layer_model(case.hm, "function", [*lead, case.hm.shape[0]], case.x.dtype, "layer.w.hm", opset)
    onnx.checker.check_model(model, full_check=True)
    assert {o.version for f in model.functions for o in f.opset_import if o.domain == ""} == {opset}
    session, optimized = _stock(model, tmp_path)
    assert_matches(case, session.run(None, {"X": case.x})[0])
    _check_folded(optimized)


@settings(max_examples=25, deadline=None)
@given(cases())
def test_function_v2_random_tilings(tmp_path_factory, case):
    """Random block trees (uneven cuts, tiers of mixed storage, permutations, float16 weights
    and activations): stock body and kernel match the product; the weights are stored once."""
    assume(not all(b.is_float for b in case.hm.blocks))
    model = _function_model(case)
    _assert_stored_once(model, case.hm)
    session, optimized = _stock(model, tmp_path_factory.mktemp("fn"))
    assert_matches(case, session.run(None, {"X": case.x})[0])
    _check_folded(optimized)
    assert_matches(case, make_session(model).run(None, {"X": case.x})[0])


def test_function_body_reads_a_factor_whose_first_row_another_factor_shares():
    """A dense block whose first row equals a one-row ``Vt`` elsewhere (found by hypothesis):
    the body takes the dense block whole from the packed data instead of copying it."""
    u = np.array([[1.2573e-4], [-1.321e-4]], np.float32)
    vt_q, scales = np.array([[127, -127]], np.int8), np.array([[9.9e-7, 1.04e-6]], np.float32)
    d = np.vstack([(vt_q * scales).astype(np.float32), np.array([[6.4e-4, 1.05e-4]], np.float32)])
    blocks = (
        Block(BlockKind.ZERO, 0, 1, 0, 4),
        Block(BlockKind.LOWRANK, 1, 3, 0, 2, storage=(StoredArray(Storage.FLOAT, u, None, 0), StoredArray(Storage.INT8, vt_q, scales, 16))),
        Block(BlockKind.DENSE, 1, 3, 2, 4, storage=(StoredArray(Storage.FLOAT, d, None, 0),)),
    )
    hm = HMatrix((3, 4), np.dtype(np.float32), blocks, norm=1.0, certified_error=0.0, tol=0.1)
    case = Case("shared first row", hm, np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32))
    model = _function_model(case)
    _assert_stored_once(model, hm)
    assert_matches(case, ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": case.x})[0])


def test_function_body_backtracks_over_column_windows():
    """A stacked factor whose pieces are columns of wider factors, where the first column that
    matches (of a one-row ``U``) leaves a rest no factor covers (found by hypothesis): the body
    tries the next match and copies no weight."""
    d = np.array([[1.2573e-4, -1.321e-4]], np.float32)
    u = np.array([[1.2573e-4, -1.321e-4]], np.float16)
    vt = np.array([[1.2573e-4, -1.321e-4], [6.4042e-4, 1.049e-4]], np.float32)
    blocks = (
        Block(BlockKind.DENSE, 0, 1, 0, 2, storage=(StoredArray(Storage.FLOAT, d, None, 0),)),
        Block(BlockKind.ZERO, 0, 1, 2, 3),
        Block(BlockKind.ZERO, 1, 2, 0, 3),
        Block(BlockKind.ZERO, 2, 3, 0, 1),
        Block(BlockKind.LOWRANK, 2, 3, 1, 3, storage=(StoredArray(Storage.FP16, u, None, 0), StoredArray(Storage.FLOAT, vt, None, 0))),
    )
    hm = HMatrix((3, 3), np.dtype(np.float32), blocks, norm=1.0, certified_error=0.0, tol=0.1)
    case = Case("column windows", hm, np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32))
    model = layer_model(hm, "function", ["b", 3], np.float32, "layer.w.hm", 21, EmitContext(x_rank=2, opset=21, family="blocks"))
    _assert_stored_once(model, hm)
    assert_matches(case, ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": case.x})[0])


def _gaussian_kernel(n: int) -> np.ndarray:
    s = np.linspace(0.0, 1.0, n)
    return np.exp(-(((s[:, None] - s[None, :]) / 0.3) ** 2)).astype(np.float32) + 0.01 * np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)


@pytest.mark.parametrize(("precision", "tol"), [("fp16", 1e-3), ("int8", 1e-2), ("int4", 1e-2), ("auto", 3e-3)])
def test_function_v2_file_stores_the_weights_once(tmp_path, precision, tol):
    """Saved file bytes: smaller than the v1 function file of the same (dequantized) weight,
    and smaller than the ops emission plus the packed bytes. (The decoders add a fixed 3-5 KB
    per model, so for an H-matrix of a few KB, e.g. this weight in int4 at tol 0.1, the v2
    function file is larger than the ops file plus the packed bytes.)"""
    hm = compress(_gaussian_kernel(256), tol, precision=precision)
    assert not all(b.is_float for b in hm.blocks)
    sizes = {}
    for name, h, mode in (("v2", hm, "function"), ("v1", as_float(hm), "function"), ("ops", hm, "ops"), ("custom", hm, "custom")):
        model = layer_model(h, mode, ["b", 256], np.float32, "layer.w.hm", 21)
        onnx.save(model, tmp_path / f"{name}.onnx")
        sizes[name] = (tmp_path / f"{name}.onnx").stat().st_size
        if name == "v2":
            _assert_stored_once(model, hm)
        if name == "custom":
            packed_bytes = _initializer_bytes(model)
    assert sizes["v2"] < sizes["v1"], sizes
    assert sizes["v2"] < sizes["ops"] + packed_bytes, sizes
    x = np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)
    y = ort.InferenceSession(str(tmp_path / "v2.onnx"), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
    ref = hm.matmul(x.astype(np.float64))
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


def test_optimized_model_stores_each_decoder_once(tmp_path):
    """Two v2 layers: one body each, every decoder once, all at the model's opset (raised to 21
    for the integer arrays); stock onnxruntime and the library agree."""
    w1, w2 = _gaussian_kernel(192)[:, :160], _gaussian_kernel(160)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 192])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 160])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    optimized, report = dehm_onnx.optimize(model, emit="function", precision="int8", tol=1e-2)
    assert len(report.compressed) == 2
    onnx.checker.check_model(optimized, full_check=True)
    opset = {o.domain: o.version for o in optimized.opset_import}
    assert opset[""] == 21
    names = [f.name for f in optimized.functions]
    # int8 arrays with float16 scales (packed modes): integers and float16 decoded once each
    assert names.count("HMatMul") == 2 and {"DecodeInt8", "DecodeFloat16"} <= set(names)
    assert len(names) == len(set(names)) + 1  # only HMatMul repeats (two overloads)
    assert all({o.domain: o.version for o in f.opset_import}[""] == 21 for f in optimized.functions)
    x = np.random.default_rng(4).standard_normal((3, 192)).astype(np.float32)
    session, folded = _stock(optimized, tmp_path)
    stock = session.run(None, {"x": x})[0]
    _check_folded(folded)
    library = make_session(optimized).run(None, {"x": x})[0]
    np.testing.assert_allclose(library, stock, rtol=1e-4, atol=1e-4 * np.abs(stock).max())
    y0 = (x @ w1) @ w2
    assert np.linalg.norm(stock - y0) <= 3e-2 * np.linalg.norm(y0)


def test_cli_function_int8(tmp_path):
    """``optimize --emit function --precision int8``: verified, v2 node, runs on stock onnxruntime."""
    rng = np.random.default_rng(3)
    w = _gaussian_kernel(192)[:, :160]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 192])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 160])], [numpy_helper.from_array(w, "w")])
    source, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    proc = subprocess.run([sys.executable, "-m", "dehm_onnx", "optimize", str(source), str(out), "--emit", "function",
                           "--precision", "int8", "--tol", "1e-2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    (node,) = [n for n in model.graph.node if n.domain == hmatmul.DOMAIN]
    data = next(t for t in model.graph.initializer if t.name == node.input[1])
    assert data.data_type == TensorProto.UINT8
    assert {f.name for f in model.functions} >= {"HMatMul", "DecodeInt8", "DecodeFloat16"}  # float16 scales in packed modes
    x = rng.standard_normal((5, 192)).astype(np.float32)
    y = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    y0 = x @ w
    assert np.linalg.norm(y - y0) <= 2e-2 * np.linalg.norm(y0)
