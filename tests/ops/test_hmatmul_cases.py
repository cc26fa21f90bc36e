"""The conformance table run through the numpy reference, the onnx.reference OpRun and the CPU kernel,
in packed layout version 1 and version 2."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from hmatmul_cases import CASES, CASES_V2, expected, tolerance

from dehm_onnx.hmatrix import pack
from dehm_onnx.ops import hmatmul
from dehm_onnx.ops.library import make_session


def _model(case):
    return hmatmul.make_hmatmul_model(pack(case.hm), x_rank=case.x.ndim)


def _run_numpy(case):
    return case.hm.matmul(case.x)


def _run_reference_op(case):
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(_model(case), new_ops=[hmatmul.HMatMul])
    return evaluator.run(None, {"X": case.x})[0]


def _run_cpu_kernel(case):
    return make_session(_model(case)).run(None, {"X": case.x})[0]


RUNNERS = {"numpy": _run_numpy, "onnx_reference": _run_reference_op, "cpu_kernel": _run_cpu_kernel}


def _model_v2(case):
    return hmatmul.make_hmatmul_model(pack(case.hm, version=2), x_rank=case.x.ndim, dtype=case.x.dtype)


def _run_reference_op_v2(case):
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(_model_v2(case), new_ops=[hmatmul.HMatMul])
    return evaluator.run(None, {"X": case.x})[0]


def _run_cpu_kernel_v2(case):
    return make_session(_model_v2(case)).run(None, {"X": case.x})[0]


RUNNERS_V2 = {"onnx_reference": _run_reference_op_v2, "cpu_kernel": _run_cpu_kernel_v2}
ALL_CASES = CASES + CASES_V2


def assert_matches(case, y):
    exp = expected(case)
    assert y.dtype == case.x.dtype
    assert y.shape == case.x.shape[:-1] + (case.hm.shape[1],)
    err = np.abs(y.astype(np.float64) - exp)
    bound = tolerance(case)
    worst = np.unravel_index(np.argmax(err - bound), err.shape) if err.size else ()
    assert np.all(err <= bound), f"{case.name}: error {err[worst]:.3e} > bound {bound[worst]:.3e} at {worst}"


@pytest.mark.parametrize("runner", sorted(RUNNERS))
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hmatmul_matches_dense_product(case, runner):
    assert_matches(case, RUNNERS[runner](case))


@pytest.mark.parametrize("runner", sorted(RUNNERS_V2))
@pytest.mark.parametrize("case", ALL_CASES, ids=[c.name for c in ALL_CASES])
def test_hmatmul_layout_v2_matches_dense_product(case, runner):
    """Layout v2 (uint8 data, storage kept): the product with the dequantized values."""
    assert_matches(case, RUNNERS_V2[runner](case))


@pytest.mark.parametrize("case", [c for c in CASES_V2 if c.hm.dtype == c.x.dtype], ids=lambda c: c.name)
def test_quantized_cases_run_in_layout_v1_too(case):
    """Layout v1 holds the same dequantized values in the weight's dtype; both kernels agree."""
    assert_matches(case, _run_cpu_kernel(case))
    assert_matches(case, _run_numpy(case))


def test_one_session_runs_layout_v1_and_v2_nodes():
    """One session runs a v1 and a v2 node of the same op side by side (kernels picked by data type)."""
    import onnx

    case = next(c for c in CASES_V2 if c.name == "q_mixed_tiers_permuted")
    x = case.x.reshape(-1, case.hm.shape[0])
    v1 = hmatmul.make_hmatmul_model(pack(case.hm), x_rank=2)
    v2 = hmatmul.make_hmatmul_model(pack(case.hm, version=2), x_rank=2)
    graph = v1.graph
    for t in v2.graph.initializer:
        t.name = t.name.replace("w.", "w2.")
        graph.initializer.append(t)
    graph.node.append(helper.make_node(hmatmul.OP_TYPE, ["X", "w2.data", "w2.layout", "w2.row_perm", "w2.col_perm"],
                                       ["Y2"], domain=hmatmul.DOMAIN))
    graph.output.append(helper.make_tensor_value_info("Y2", TensorProto.FLOAT, ["d0", case.hm.shape[1]]))
    onnx.checker.check_model(v1)
    y1, y2 = make_session(v1).run(None, {"X": x})
    sub = type(case)(case.name, case.hm, x)
    assert_matches(sub, y1)
    assert_matches(sub, y2)


def test_hmatmul_contract_constants():
    assert (hmatmul.DOMAIN, hmatmul.OP_TYPE, hmatmul.VERSION) == ("ai.dehm", "HMatMul", 1)
    assert hmatmul.INPUTS == ("X", "data", "layout", "row_perm", "col_perm")


def test_reference_rejects_mixed_dtypes():
    case = CASES[0]
    p = pack(case.hm)
    with pytest.raises(ValueError, match="data dtype"):
        hmatmul.hmatmul_reference(case.x, p.data.astype(np.float16), p.layout, p.row_perm, p.col_perm)


def test_cpu_kernel_rejects_wrong_x_width():
    case = CASES[1]
    session = make_session(hmatmul.make_hmatmul_model(pack(case.hm), packed_as_inputs=True))
    p = pack(case.hm)
    feeds = {"w.data": p.data, "w.layout": p.layout, "w.row_perm": p.row_perm, "w.col_perm": p.col_perm}
    with pytest.raises(Exception, match="HMatMul: X has last dimension 6"):
        session.run(None, {"X": np.zeros((2, 6), np.float32), **feeds})


def _cuda_missing_reason():
    """None when onnxruntime can run on a CUDA device, else why not."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "CUDAExecutionProvider not available (needs onnxruntime-gpu and a CUDA device)"
    try:
        # A plain MatMul: the probe asks about the device, not about the HMatMul library.
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["X", "W"], ["Y"])], "probe",
            [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 2])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 2])],
            [numpy_helper.from_array(np.eye(2, dtype=np.float32), "W")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - any failure here means no usable device
        return f"CUDA session cannot start: {e}".splitlines()[0]
    if "CUDAExecutionProvider" not in session.get_providers():
        return "onnxruntime fell back to CPU: no CUDA device"
    return None


@pytest.fixture(scope="module")
def cuda_session():
    """Makes sessions that run HMatMul on the CUDA kernel; skips without a usable CUDA device."""
    reason = _cuda_missing_reason()
    if reason:
        pytest.skip(reason)

    def make(model):
        # No CPU fallback: the HMatMul node must run on the CUDA kernel or the session fails.
        return make_session(model, providers=["CUDAExecutionProvider"],
                            config={"session.disable_cpu_ep_fallback": "1"})

    return make


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cuda_kernel_matches_dense_product(case, cuda_session):
    assert_matches(case, cuda_session(_model(case)).run(None, {"X": case.x})[0])


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cuda_kernel_packed_as_inputs(case, cuda_session):
    """Packed arrays fed at run time: the kernel validates and uploads them on every run."""
    p = pack(case.hm)
    model = hmatmul.make_hmatmul_model(p, x_rank=case.x.ndim, packed_as_inputs=True)
    feeds = {"X": case.x, "w.data": p.data, "w.layout": p.layout, "w.row_perm": p.row_perm, "w.col_perm": p.col_perm}
    assert_matches(case, cuda_session(model).run(None, feeds)[0])


def _check_reuse_across_batch_sizes(session_for):
    case = next(c for c in CASES if c.name == "parallel_batch_major")
    model = _model(case)
    model.graph.input[0].type.tensor_type.shape.dim[-1].dim_param = "m"  # so a wrong width reaches the kernel
    session = session_for(model)
    with pytest.raises(Exception, match="HMatMul: X has last dimension 5"):
        session.run(None, {"X": np.zeros((1, 5), case.x.dtype)})  # first run rejected: nothing cached
    for rows in (case.x.shape[0], 1, 0, 3, case.x.shape[0]):
        sub = type(case)(case.name, case.hm, case.x[:rows])
        assert_matches(sub, session.run(None, {"X": sub.x})[0])
    with pytest.raises(Exception, match="HMatMul: X has last dimension 6"):
        session.run(None, {"X": np.zeros((2, 6), case.x.dtype)})
    sub = type(case)(case.name, case.hm, case.x[:2])
    assert_matches(sub, session.run(None, {"X": sub.x})[0])  # a rejected run leaves the node usable


def test_cpu_kernel_reuses_plan_across_batch_sizes():
    """Constant packed inputs are validated once; later runs with other batches agree."""
    _check_reuse_across_batch_sizes(make_session)


@pytest.mark.cuda
def test_cuda_kernel_reuses_tables_across_batch_sizes(cuda_session):
    """The constant-layout path uploads its tables once; later runs with other batches agree."""
    _check_reuse_across_batch_sizes(cuda_session)


@pytest.fixture(scope="module")
def cuda_fallback_session():
    """Sessions with the CUDA execution provider first and CPU allowed; skips without a CUDA device."""
    reason = _cuda_missing_reason()
    if reason:
        pytest.skip(reason)
    return lambda model: make_session(model, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES_V2, ids=[c.name for c in CASES_V2])
def test_cuda_session_runs_layout_v2_on_the_cpu_kernel(case, cuda_fallback_session):
    """The CUDA kernel reads layout v1 only: onnxruntime places a v2 node on the CPU kernel, never misreads it."""
    assert_matches(case, cuda_fallback_session(_model_v2(case)).run(None, {"X": case.x})[0])


@pytest.mark.cuda
def test_cuda_only_session_refuses_layout_v2(cuda_session):
    """With CPU fallback disabled, a v2 node has no CUDA kernel to run on: onnxruntime refuses the session."""
    case = CASES_V2[0]
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime's own message, not ours
        cuda_session(_model_v2(case)).run(None, {"X": case.x})
