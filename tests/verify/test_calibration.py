"""Calibration inputs: generated from the input signature, or loaded from .npz files."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from dehm_onnx.errors import ConfigError
from dehm_onnx.verify.calibration import (
    DEFAULT_BATCH_DIM,
    DEFAULT_DYNAMIC_DIM,
    DEFAULT_INT_RANGE,
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


def test_generate_calibration_is_dtype_aware_and_uses_default_dims():
    calib = generate_calibration(_model(), num_samples=5)
    x, ids, mask = calib.arrays["x"], calib.arrays["ids"], calib.arrays["mask"]
    assert calib.num_samples == 5
    assert x.dtype == np.float32 and x.shape == (5, DEFAULT_BATCH_DIM, DEFAULT_DYNAMIC_DIM, 8)
    assert ids.dtype == np.int64 and ids.shape == (5, DEFAULT_BATCH_DIM, DEFAULT_DYNAMIC_DIM)
    assert DEFAULT_INT_RANGE[0] <= ids.min() and ids.max() <= DEFAULT_INT_RANGE[1]
    assert mask.dtype == bool and mask.shape == (5, DEFAULT_BATCH_DIM)


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
    with pytest.raises(ConfigError, match="cannot read calibration file"):
        load_calibration(_model(), [path])
    with pytest.raises(ConfigError, match="cannot read calibration file"):
        load_calibration(_model(), tmp_path / "missing.npz")
