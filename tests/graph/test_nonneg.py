"""The sign analysis on onnx-ir and the clamp the pass adds after a provably nonnegative layer."""

from __future__ import annotations

import numpy as np
from onnx import helper

import dehm_onnx
from dehm_onnx.graph.nonneg import nonnegative_tensors
from tests.conftest import make_model, run_model


def test_signs_follow_the_rules():
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["sq"]),
        helper.make_node("Pow", ["x", "two"], ["p2"]),
        helper.make_node("Pow", ["x", "half"], ["p_half"]),
        helper.make_node("Abs", ["x"], ["a"]),
        helper.make_node("MatMul", ["a", "pos"], ["mm_pos"]),
        helper.make_node("MatMul", ["a", "mixed"], ["mm_mixed"]),
        helper.make_node("Sub", ["sq", "a"], ["diff"]),
        helper.make_node("Add", ["mm_pos", "p2"], ["y"]),
    ]
    inits = [("two", np.array(2.0, np.float32)), ("half", np.array(0.5, np.float32)),
             ("pos", np.abs(np.eye(8, dtype=np.float32))), ("mixed", np.eye(8, dtype=np.float32) - 0.5)]
    model = make_model(nodes, [("x", np.float32, [2, 8])], [("y", np.float32, [2, 8])], inits)
    signs = nonnegative_tensors(model)
    assert {"sq", "p2", "a", "mm_pos", "y", "pos"} <= signs
    assert not {"x", "p_half", "mm_mixed", "diff", "mixed"} & signs


def _banded(n: int, m: int) -> np.ndarray:
    rows, centers = np.arange(n)[:, None], np.linspace(0, n - 1, m)[None, :]
    return np.exp(-((rows - centers) ** 2) / (2 * 12.0**2)).astype(np.float32)


def test_nonnegative_layer_is_clamped_and_a_signed_one_is_not(rng):
    w = _banded(128, 96)
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["power"]),
        helper.make_node("MatMul", ["power", "w"], ["mel"], name="fbank"),
        helper.make_node("MatMul", ["x", "w2"], ["lin"], name="signed"),
    ]
    model = make_model(nodes, [("x", np.float32, [4, 128])], [("mel", np.float32, [4, 96]), ("lin", np.float32, [4, 96])],
                       [("w", w), ("w2", w.copy())])
    out, report = dehm_onnx.optimize(model, tol=0.05, emit="ops", no_verify=True)
    assert [r.compressed for r in report.layers] == [True, True]
    clamps = [n for n in out.graph.node if n.op_type == "Relu"]
    assert len(clamps) == 1 and {p.key: p.value for p in clamps[0].metadata_props}["dehm.source_node"] == "fbank"
    mel = run_model(out, {"x": rng.standard_normal((4, 128)).astype(np.float32)})[0]
    assert mel.min() >= 0.0
