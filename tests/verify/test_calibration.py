"""Calibration inputs: generated from the input signature, or loaded from .npz files."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from dehm_onnx.errors import ConfigError
from dehm_onnx.verify.calibration import (
    DEFAULT_INT_RANGE,
    DYNAMIC_SIZES,
    GENERATED_BYTES_LIMIT,
    generate_calibration,
    load_calibration,
    parse_input_ranges,
    parse_input_shapes,
    resolve_calibration,
)


def _model():
    """Inputs: x float32 [N, T, 8], ids int64 [N, T], mask bool [N]."""
    nodes = [helper.make_node("Identity", ["x"], ["y"])]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", 8]),
        helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "T"]),
        helper.make_tensor_value_info("mask", TensorProto.BOOL, ["N"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs), ir_version=10)


def test_generate_calibration_is_dtype_aware_and_grows_dynamic_axes_while_the_model_runs():
    calib = generate_calibration(_model(), num_samples=2)
    x, ids, mask = calib.arrays["x"], calib.arrays["ids"], calib.arrays["mask"]
    assert calib.num_samples == 2 and calib.generated
    t = DYNAMIC_SIZES[-1]  # the Identity model runs at every size: the largest is used
    assert x.dtype == np.float32 and x.shape == (2, 1, t, 8)
    assert ids.dtype == np.int64 and ids.shape == (2, 1, t)
    assert DEFAULT_INT_RANGE[0] <= ids.min() and ids.max() <= DEFAULT_INT_RANGE[1]
    assert mask.dtype == bool and mask.shape == (2, 1) and mask.all()  # a mask: ones
    assert "mask" in calib.how["mask"] and "default" in calib.how["ids"] and "N(0, 1)" in calib.how["x"]
    assert any(f"other dynamic axes at {t}" in n for n in calib.notes)
    unprobed = generate_calibration(_model(), num_samples=2, probe=False)
    assert unprobed.arrays["x"].shape == (2, 1, 1, 8)


def test_generate_calibration_honours_shapes_ranges_and_seed():
    kwargs = dict(num_samples=3, input_shapes={"x": (2, 7, 8), "ids": (2, 7)}, input_ranges={"ids": (5, 6)})
    a = generate_calibration(_model(), seed=1, **kwargs)
    b = generate_calibration(_model(), seed=1, **kwargs)
    c = generate_calibration(_model(), seed=2, **kwargs)
    assert a.arrays["x"].shape == (3, 2, 7, 8)
    assert set(np.unique(a.arrays["ids"])) <= {5, 6}
    np.testing.assert_array_equal(a.arrays["x"], b.arrays["x"])
    assert not np.array_equal(a.arrays["x"], c.arrays["x"])
    first = next(a.samples())
    assert set(first) == {"x", "ids", "mask"} and first["x"].shape == (2, 7, 8)


def test_parse_overrides_from_cli_strings():
    assert parse_input_shapes(["x=1x128", "s="]) == {"x": (1, 128), "s": ()}
    assert parse_input_ranges(["ids=-3:40"]) == {"ids": (-3, 40)}
    calib = resolve_calibration(_model(), None, num_samples=2, input_shapes=["x=1x4x8"], input_ranges=["ids=0:1"])
    assert calib.arrays["x"].shape == (2, 1, 4, 8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_shapes={"x": (1, 8)}), "has 2 dims"),
        (dict(input_shapes={"x": (1, 4, 9)}), "fixes it to 8"),
        (dict(input_shapes={"nope": (1,)}), "unknown input"),
        (dict(input_ranges={"ids": (0, 2**70)}), "does not fit"),
        (dict(num_samples=0), "num_samples"),
        (dict(input_shapes={"x": (0, 4, 8)}), r"calibration input 'x' has shape \(0, 4, 8\) with a zero-size axis"),
        (dict(num_samples=10**9), r"input 'x' would take .* GiB .* lower --num-samples .* --input-shape x="),
        (dict(input_shapes={"x": (2**40, 4, 8)}), r"input 'x' would take .* --input-shape x="),
    ],
)
def test_generate_calibration_rejects_bad_overrides(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        generate_calibration(_model(), **kwargs)


@pytest.mark.parametrize(
    "items, parser, match",
    [(["x:1x2"], parse_input_shapes, "NAME=1x128"), (["x=1x"], parse_input_shapes, "NAME=1x128"),
     (["ids=3"], parse_input_ranges, "NAME=LO:HI"), (["ids=4:3"], parse_input_ranges, "LO 4 > HI 3")],
)
def test_parse_overrides_reject_malformed_items(items, parser, match):
    with pytest.raises(ConfigError, match=match):
        parser(items)


def _save(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_load_calibration_splits_samples_and_concatenates_files(tmp_path):
    rng = np.random.default_rng(0)
    with_batch = _save(tmp_path / "a.npz", x=rng.standard_normal((4, 1, 3, 8)), ids=np.ones((4, 1, 3), np.int32),
                       mask=np.zeros((4, 1), bool))
    batch_as_samples = _save(tmp_path / "b.npz", x=rng.standard_normal((2, 3, 8)), ids=np.ones((2, 3), np.int64),
                             mask=np.zeros(2, bool))
    calib = load_calibration(_model(), [with_batch, batch_as_samples])
    assert calib.num_samples == 6
    assert calib.arrays["x"].dtype == np.float32 and calib.arrays["x"].shape == (6, 1, 3, 8)
    assert calib.arrays["ids"].dtype == np.int64


@pytest.mark.parametrize(
    "arrays, match",
    [
        (dict(x=np.zeros((2, 1, 3, 8)), ids=np.zeros((2, 1, 3), np.int64)), r"missing input\(s\) \['mask'\]"),
        (dict(x=np.zeros((2, 1, 3, 8)), ids=np.zeros((2, 1, 3), np.int64), mask=np.zeros((2, 1), bool),
              extra=np.zeros(2)), r"unknown array\(s\) \['extra'\]"),
        (dict(x=np.zeros((2, 1, 3, 9)), ids=np.zeros((2, 1, 3), np.int64), mask=np.zeros((2, 1), bool)),
         "sample shape"),
        (dict(x=np.zeros((2, 1, 3, 8)), ids=np.zeros((2, 1, 3), np.float32), mask=np.zeros((2, 1), bool)),
         "dtype float32"),
        (dict(x=np.zeros((2, 1, 3, 8)), ids=np.zeros((3, 1, 3), np.int64), mask=np.zeros((2, 1), bool)),
         "different sample counts"),
        (dict(x=np.zeros((8,)), ids=np.zeros((2, 1, 3), np.int64), mask=np.zeros((2, 1), bool)), "expected"),
    ],
)
def test_load_calibration_reports_mismatches(tmp_path, arrays, match):
    path = _save(tmp_path / "c.npz", **arrays)
    with pytest.raises(ConfigError, match=match):
        load_calibration(_model(), [path])


def test_load_calibration_reports_unreadable_file(tmp_path):
    path = tmp_path / "broken.npz"
    path.write_text("not a zip")
    with pytest.raises(ConfigError, match="cannot read calibration file .*: not an .npz file$"):
        load_calibration(_model(), [path])
    with pytest.raises(ConfigError, match="does not exist"):
        load_calibration(_model(), tmp_path / "missing.npz")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(ConfigError, match=r"not an .npz file \(a single .npy array\)"):
        load_calibration(_model(), tmp_path / "single.npy")
    pickled = tmp_path / "p.npz"
    import pickle

    pickled.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(ConfigError, match="not an .npz file") as info:
        load_calibration(_model(), pickled)
    assert "allow_pickle" not in str(info.value) and str(info.value).endswith("not an .npz file")


def test_empty_calibration_is_refused(tmp_path):
    path = _save(tmp_path / "empty.npz", x=np.zeros((0, 1, 3, 8)), ids=np.zeros((0, 1, 3), np.int64),
                 mask=np.zeros((0, 1), bool))
    with pytest.raises(ConfigError, match="no samples"):
        load_calibration(_model(), [path])
    zero_axis = _save(tmp_path / "zero.npz", x=np.zeros((2, 1, 0, 8)), ids=np.zeros((2, 1, 0), np.int64),
                      mask=np.zeros((2, 1), bool))
    with pytest.raises(ConfigError, match="zero-size axis"):
        load_calibration(_model(), [zero_axis])


def _declared(dims, dtype=TensorProto.FLOAT):
    nodes = [helper.make_node("Identity", ["x"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", dtype, dims)],
                              [helper.make_tensor_value_info("y", dtype, None)])
    return helper.make_model(graph, ir_version=10)


def test_declared_shapes_that_are_negative_empty_or_huge_are_refused_before_allocating():
    bad = _declared([1, 4])
    bad.graph.input[0].type.tensor_type.shape.dim[1].dim_value = -4
    with pytest.raises(ConfigError, match="input 'x' declares a negative dimension -4 at axis 1"):
        generate_calibration(bad)
    with pytest.raises(ConfigError, match="input 'x' has shape \\(0, 256\\) with a zero-size axis"):
        generate_calibration(_declared([0, 256]))
    with pytest.raises(ConfigError, match=f"more than the {GENERATED_BYTES_LIMIT / 2**30:g} GiB limit"):
        generate_calibration(_declared([2**40, 256]))


def _gather_model():
    """ids -> Cast -> Gather(table of 2 rows); tokens -> Gather(table of 30 rows); attention_mask; lens."""
    inits = [numpy_helper.from_array(np.zeros((2, 4), np.float32), "types"),
             numpy_helper.from_array(np.zeros((30, 4), np.float32), "words")]
    nodes = [
        helper.make_node("Cast", ["token_type_ids"], ["tt"], to=TensorProto.INT64),
        helper.make_node("Gather", ["types", "tt"], ["e0"]),
        helper.make_node("Unsqueeze", ["input_ids", "axes"], ["ids3"]),
        helper.make_node("Squeeze", ["ids3", "axes"], ["ids2"]),
        helper.make_node("Gather", ["words", "ids2"], ["e1"]),
        helper.make_node("Add", ["e0", "e1"], ["y"]),
    ]
    inits.append(numpy_helper.from_array(np.array([0], np.int64), "axes"))
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("token_type_ids", TensorProto.INT32, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"]),
              helper.make_tensor_value_info("x_lens", TensorProto.INT64, ["batch"])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_integer_inputs_index_inside_their_gather_tables_and_masks_are_ones():
    model = _gather_model()
    calib = generate_calibration(model, num_samples=64, input_shapes={"x": (1, 5)})
    a = calib.arrays
    assert a["token_type_ids"].min() == 0 and a["token_type_ids"].max() == 1  # 2-row table
    assert a["input_ids"].max() > 9 and a["input_ids"].max() <= 29  # 30-row table, not 0..9
    assert (a["attention_mask"] == 1).all()
    assert (a["x_lens"] == 5).all()  # the length of the generated sequences
    assert "2-row Gather table" in calib.how["token_type_ids"] and "30-row" in calib.how["input_ids"]
    assert "mask" in calib.how["attention_mask"] and "lengths" in calib.how["x_lens"]
    ranged = generate_calibration(model, num_samples=8, input_ranges={"input_ids": (3, 3)})
    assert (ranged.arrays["input_ids"] == 3).all() and "--input-range" in ranged.how["input_ids"]


def _min_length_model(minimum: int):
    """x [batch, T] -> Pad(reflect, minimum) : runs only when T > minimum (like an audio front end)."""
    pads = numpy_helper.from_array(np.array([0, minimum, 0, minimum], np.int64), "pads")
    nodes = [helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "T"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [pads])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _max_length_model(maximum: int):
    """x [batch, T] -> Add of a constant row of length ``maximum`` after slicing T to it: T <= maximum."""
    row = numpy_helper.from_array(np.zeros((1, maximum), np.float32), "row")
    starts, ends = (numpy_helper.from_array(np.array([v], np.int64), n) for v, n in ((0, "s0"), (maximum, "e0")))
    axes = numpy_helper.from_array(np.array([1], np.int64), "ax")
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Slice", ["row", "s0", "e0", "ax"], ["cut"]),
             helper.make_node("Slice", ["cut", "s0", "t_end", "ax"], ["part"]),
             helper.make_node("Gather", ["shape", "one"], ["t"], axis=0),
             helper.make_node("Unsqueeze", ["t", "ax0"], ["t_end"]),
             helper.make_node("Add", ["x", "part"], ["y"])]
    inits = [row, starts, ends, axes, numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.array([0], np.int64), "ax0")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "T"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_dynamic_axes_get_the_largest_size_the_model_accepts():
    calib = generate_calibration(_min_length_model(200), num_samples=2)
    # 1, 16 and 64 fail; 256 runs, and so do the larger sizes: the largest is used.
    assert calib.arrays["x"].shape == (2, 1, DYNAMIC_SIZES[-1])
    (note,) = calib.notes
    assert f"other dynamic axes at {DYNAMIC_SIZES[-1]}" in note and "3 smaller assignment(s) rejected" in note
    # Growing stops at the first size that fails after one ran: a model taking at most 100.
    capped = generate_calibration(_max_length_model(100), num_samples=1)
    assert capped.arrays["x"].shape == (1, 1, 64)
    with pytest.raises(ConfigError, match=r"input 'x' axis 1 is dynamic .* --input-shape x=1xN"):
        generate_calibration(_min_length_model(20000), num_samples=2)
    fixed = generate_calibration(_min_length_model(20000), num_samples=1, input_shapes={"x": (1, 20001)})
    assert fixed.arrays["x"].shape == (1, 1, 20001)
