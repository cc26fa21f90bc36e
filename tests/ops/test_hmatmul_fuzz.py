"""Malformed packed inputs make the CPU kernel return an error, never crash or misread.

Each hypothesis example mutates a valid packed H-matrix a few dozen times and runs all the
mutants in one subprocess (a segfault would otherwise kill pytest). The numpy reference
(``pack.validate_packed`` via ``hmatmul_reference``) is the oracle: where it rejects the
input the kernel must fail with an ``HMatMul:`` message; where it accepts, the outputs agree.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hmatmul_cases import CASES

from dehm_onnx.hmatrix import pack
from dehm_onnx.ops.hmatmul import hmatmul_reference, make_hmatmul_model
from dehm_onnx.ops.library import custom_op_library

WORKER = Path(__file__).with_name("_fuzz_worker.py")
BASE = next(c for c in CASES if c.name == "hodlr_permuted_3d")
I64 = np.iinfo(np.int64)
INTERESTING = [-1, 0, 1, 2, 3, 28, 29, 30, 36, 37, 38, 2**31, 2**32 + 1, 2**62, I64.max, I64.min, I64.max // 7]

values = st.one_of(st.sampled_from(INTERESTING), st.integers(-3, 400))
mutation = st.one_of(
    st.tuples(st.just("layout_cell"), st.integers(0, 10**6), st.integers(0, 6), values),
    st.tuples(st.just("truncate_data"), st.integers(0, 10**6)),
    st.tuples(st.sampled_from(["row_perm", "col_perm"]), st.integers(0, 10**6), values),
    st.tuples(st.sampled_from(["drop_row_perm", "drop_col_perm", "short_row_perm", "short_col_perm"])),
    st.tuples(st.sampled_from(["layout_6_cols", "layout_1d", "layout_empty", "layout_drop_row", "layout_dup_row"])),
    st.tuples(st.just("x_width"), st.integers(0, 40)),
    st.tuples(st.just("data_2d")),
)


def _apply(mutations):
    p = pack(BASE.hm)
    x = BASE.x.reshape(-1, BASE.x.shape[-1]).copy()
    data, layout, rp, cp = p.data.copy(), p.layout.copy(), p.row_perm.copy(), p.col_perm.copy()
    for mut in mutations:
        kind = mut[0]
        if kind == "layout_cell" and layout.ndim == 2 and layout.size:
            layout[mut[1] % layout.shape[0], mut[2] % layout.shape[1]] = mut[3]
        elif kind == "truncate_data" and data.ndim == 1:
            data = data[: mut[1] % (data.size + 1)]
        elif kind in ("row_perm", "col_perm"):
            perm = rp if kind == "row_perm" else cp
            if perm.size:
                perm[mut[1] % perm.size] = mut[2]
        elif kind == "drop_row_perm":
            rp = rp[:0]
        elif kind == "drop_col_perm":
            cp = cp[:0]
        elif kind == "short_row_perm":
            rp = rp[:-1]
        elif kind == "short_col_perm":
            cp = cp[:-1]
        elif kind == "layout_6_cols" and layout.ndim == 2:
            layout = np.ascontiguousarray(layout[:, :6])
        elif kind == "layout_1d":
            layout = layout.ravel()
        elif kind == "layout_empty" and layout.ndim == 2:
            layout = layout[:0]
        elif kind == "layout_drop_row" and layout.ndim == 2 and layout.shape[0]:
            layout = layout[1:]
        elif kind == "layout_dup_row" and layout.ndim == 2 and layout.shape[0]:
            layout = np.concatenate([layout, layout[-1:]])
        elif kind == "x_width":
            x = np.resize(x, (x.shape[0], mut[1]))
        elif kind == "data_2d" and data.ndim == 1:
            data = data.reshape(1, -1)
    return x, data, np.ascontiguousarray(layout), rp, cp


def _oracle(inputs):
    try:
        return hmatmul_reference(*inputs), ""
    except Exception as e:  # noqa: BLE001 - the reference's verdict is all we need
        return None, str(e)


def _run_in_subprocess(tmp_path, inputs_list, version: int = 1):
    cases_path, results_path = tmp_path / "cases.pkl", tmp_path / "results.pkl"
    with open(cases_path, "wb") as f:
        pickle.dump(inputs_list, f)
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(custom_op_library()), str(cases_path), str(results_path), str(version)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"worker died with code {proc.returncode}: {proc.stderr[-2000:]}"
    with open(results_path, "rb") as f:
        return pickle.load(f)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(mutation, min_size=1, max_size=3), min_size=40, max_size=40))
def test_cpu_kernel_malformed_inputs_fail_cleanly(tmp_path, mutation_sets):
    inputs_list = [_apply(muts) for muts in mutation_sets]
    results = _run_in_subprocess(tmp_path, inputs_list)
    for muts, inputs, (ok, msg, y) in zip(mutation_sets, inputs_list, results):
        expected, why = _oracle(inputs)
        if expected is None:
            assert not ok, f"{muts}: reference rejected ({why}) but the kernel accepted"
            assert "HMatMul:" in msg, f"{muts}: unexpected error {msg!r}"
        else:
            assert ok, f"{muts}: reference accepted but the kernel failed: {msg}"
            np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4 * (1 + np.abs(expected).max()))


def _structural_model(edit):
    model = make_hmatmul_model(pack(BASE.hm))
    edit(model)
    return model


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.graph.node[0].input.pop(),  # 4 inputs
        lambda m: m.graph.initializer[0].CopyFrom(
            __import__("onnx").numpy_helper.from_array(pack(BASE.hm).data.astype(np.float16), "w.data")),
    ],
    ids=["missing_input", "mixed_dtypes"],
)
def test_cpu_kernel_structural_errors_fail_cleanly(tmp_path, edit):
    model = _structural_model(edit)
    path = tmp_path / "bad.onnx"
    path.write_bytes(model.SerializeToString())
    script = (
        "import sys, numpy as np, onnxruntime as ort\n"
        "o = ort.SessionOptions(); o.register_custom_ops_library(sys.argv[1])\n"
        "try:\n"
        "    s = ort.InferenceSession(sys.argv[2], o, providers=['CPUExecutionProvider'])\n"
        "    s.run(None, {'X': np.ones((2, 37), np.float32)})\n"
        "except Exception as e:\n"
        "    print('ERROR', e); sys.exit(0)\n"
        "print('OK')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(custom_op_library()), str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"crashed with code {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.startswith("ERROR"), proc.stdout
