"""Every SkipReason: the node is left untouched and the reason recorded as a sentence."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import dehm_onnx
from dehm_onnx.errors import CompressionError, ConfigError
from dehm_onnx.compression.skips import SkipReason
from tests.conftest import low_rank, make_model, smooth_kernel


def _single(w, name="fc", weight="fc.weight", opset=17, x_dtype=np.float32):
    m, n = w.shape
    return make_model(
        [helper.make_node("MatMul", ["x", weight], ["y"], name=name)],
        [("x", x_dtype, ["B", m])],
        [("y", x_dtype, ["B", n])],
        [(weight, w)],
        opset=opset,
    )


def _assert_skipped(model, reason: SkipReason, fragment: str, **options):
    out, report = dehm_onnx.optimize(model, **options)
    (record,) = report.layers
    assert not record.compressed and record.skip_reason == reason.name
    assert fragment in record.reason
    assert out.SerializeToString() == model.SerializeToString()
    assert report.params_after == report.params_before
    return record


def test_skip_not_included(rng):
    _assert_skipped(_single(low_rank(rng, 96, 96)), SkipReason.NOT_INCLUDED, "--include", include=("other*",))


def test_include_matches_node_or_weight_name(rng):
    for pattern in ("f?", "fc.w*"):
        _, report = dehm_onnx.optimize(_single(low_rank(rng, 96, 96)), include=(pattern,))
        assert report.layers[0].compressed


def test_skip_excluded(rng):
    _assert_skipped(_single(low_rank(rng, 96, 96)), SkipReason.EXCLUDED, "'*.weight'", exclude=("*.weight",))


def test_skip_opset_too_old(rng):
    _assert_skipped(_single(low_rank(rng, 96, 96), opset=9), SkipReason.OPSET_TOO_OLD, "opset 9")


def test_skip_weight_is_graph_input(rng):
    model = _single(low_rank(rng, 96, 96))
    model.graph.input.append(helper.make_tensor_value_info("fc.weight", onnx.TensorProto.FLOAT, [96, 96]))
    _assert_skipped(model, SkipReason.WEIGHT_IS_GRAPH_INPUT, "graph input")


def test_skip_not_2d(rng):
    w = rng.standard_normal((2, 96, 96)).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="batched")],
        [("x", np.float32, [2, 5, 96])],
        [("y", np.float32, [2, 5, 96])],
        [("w", w)],
    )
    _assert_skipped(model, SkipReason.NOT_2D, "[2, 96, 96]")


def test_skip_unsupported_dtype(rng):
    w = rng.integers(-3, 3, (96, 96)).astype(np.int32)
    _assert_skipped(_single(w, x_dtype=np.int32), SkipReason.UNSUPPORTED_DTYPE, "int32")


def test_skip_too_small(rng):
    _assert_skipped(_single(low_rank(rng, 200, 32)), SkipReason.TOO_SMALL, "32 < min_size 64")
    _, report = dehm_onnx.optimize(_single(low_rank(rng, 200, 32)), min_size=32)
    assert report.layers[0].compressed


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_skip_non_finite(rng, bad):
    w = low_rank(rng, 96, 96)
    w[3, 5] = bad
    w[7, 1] = -np.inf
    _assert_skipped(_single(w), SkipReason.NON_FINITE, "2 NaN/Inf")


def test_skip_not_smaller(rng):
    w = rng.standard_normal((96, 96)).astype(np.float32)  # Gaussian: no structure to exploit
    record = _assert_skipped(_single(w), SkipReason.NOT_SMALLER, ">= 9216 parameters")
    assert record.ratio is None


def test_skip_little_gain(rng):
    w = smooth_kernel(128, 128)
    compressed, report = dehm_onnx.optimize(_single(w))
    (layer,) = report.layers
    assert layer.compressed and layer.ratio > 0.05
    _assert_skipped(_single(w), SkipReason.LITTLE_GAIN, "> max_ratio 0.05", max_ratio=0.05)


def test_max_ratio_must_be_in_range():
    with pytest.raises(ConfigError, match="max_ratio"):
        dehm_onnx.OptimizeConfig(max_ratio=0.0)
    with pytest.raises(ConfigError, match="max_ratio"):
        dehm_onnx.OptimizeConfig(max_ratio=1.5)


def test_skip_compression_failed(rng, monkeypatch):
    def fail(w, tol, *, seed=0):
        raise CompressionError("SVD did not converge")

    monkeypatch.setattr("dehm_onnx.compression.parallel.compress", fail)  # the pass compresses via dehm_onnx.compression.parallel
    _assert_skipped(_single(low_rank(rng, 96, 96)), SkipReason.COMPRESSION_FAILED, "SVD did not converge")


def test_skip_shared_weight_reason_names_the_dense_user(rng):
    w = low_rank(rng, 96, 96)
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("Gather", ["w", "idx"], ["g"], name="embed"),
        ],
        [("x", np.float32, [4, 96]), ("idx", np.int64, [4])],
        [("h", np.float32, [4, 96]), ("g", np.float32, [4, 96])],
        [("w", w)],
    )
    _assert_skipped(model, SkipReason.SHARED_WEIGHT, "'embed'")


def test_shared_weight_with_one_excluded_user_stays_dense_everywhere(rng):
    w = low_rank(rng, 96, 96)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="a"), helper.make_node("MatMul", ["h", "w"], ["y"], name="b")],
        [("x", np.float32, [4, 96])],
        [("y", np.float32, [4, 96])],
        [("w", w)],
    )
    out, report = dehm_onnx.optimize(model, exclude=("b",))
    assert [r.skip_reason for r in report.layers] == ["SHARED_WEIGHT", "EXCLUDED"]
    assert out.SerializeToString() == model.SerializeToString()


def test_every_skip_reason_has_a_test():
    import inspect
    import sys

    source = inspect.getsource(sys.modules[__name__])
    missing = [r.name for r in SkipReason if f"SkipReason.{r.name}" not in source and r.name not in ("UNKNOWN_RANK",)]
    assert missing == []  # UNKNOWN_RANK is covered in test_rewrite.py


def test_config_errors_name_the_option():
    from dehm_onnx.errors import ConfigError

    for options, fragment in (
        ({"tol": 0.0}, "tol must be in (0, 1)"),
        ({"tol": 1.0}, "tol must be in (0, 1)"),
        ({"min_size": 0}, "min_size"),
        ({"emit": "nope"}, "emit must be one of"),
        ({"include": "fc*"}, "include must be a sequence"),
        ({"colour": "red"}, "unknown option"),
    ):
        with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            dehm_onnx.optimize(onnx.ModelProto(), **options)


def test_skip_bfloat16_weight():
    # onnxruntime's CPU provider has no bfloat16 MatMul; such weights are left alone.
    w = helper.make_tensor("w", onnx.TensorProto.BFLOAT16, [96, 96], np.zeros(96 * 96, np.uint16).tobytes(), raw=True)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="bf16")],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.BFLOAT16, [2, 96])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.BFLOAT16, [2, 96])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    _assert_skipped(model, SkipReason.UNSUPPORTED_DTYPE, "bfloat16")
