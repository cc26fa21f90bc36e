"""Malformed layout-v2 inputs make the CPU kernel return an error, never crash or misread.

As ``test_hmatmul_fuzz.py`` does for version 1: each hypothesis example mutates a valid
version-2 packed H-matrix (layout cells, format codes, offsets, the bytes of ``data``) a few
dozen times and runs every mutant in one subprocess; ``pack.validate_packed`` (through
``hmatmul_reference``) is the oracle.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hmatmul_cases import CASES_V2
from test_hmatmul_fuzz import I64, _oracle, _run_in_subprocess

from dehm_onnx.hmatrix import pack
from dehm_onnx.hmatrix.pack import BYTE_OFFSET, FORMATS, Elem, format_code

BASE = next(c for c in CASES_V2 if c.name == "q_mixed_tiers_permuted")
CODES = [format_code(e, s, g) for e in Elem for s in (Elem.FLOAT32, Elem.FLOAT16) for g in (16, 32, 128)]
PAIRS = [a + 65536 * b for a in CODES for b in (0, *CODES)]
INTERESTING = [-1, 0, 1, 2, 3, 8, 15, 16, 17, 21, 30, 40, 2**31, 2**62, I64.max, I64.min, 0x80, 65536 + 2, *CODES]

values = st.one_of(st.sampled_from(INTERESTING), st.integers(-3, 4000))
mutation = st.one_of(
    st.tuples(st.just("layout_cell"), st.integers(0, 10**6), st.integers(0, 7), values),
    st.tuples(st.just("format_cell"), st.integers(0, 10**6), st.just(FORMATS), st.sampled_from(PAIRS)),
    st.tuples(st.just("offset_cell"), st.integers(0, 10**6), st.just(BYTE_OFFSET), st.integers(-2, 600)),
    st.tuples(st.just("data_byte"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("truncate_data"), st.integers(0, 10**6)),
    st.tuples(st.sampled_from(["layout_7_cols", "layout_drop_row", "layout_dup_row", "layout_swap_rows"])),
    st.tuples(st.just("x_width"), st.integers(0, 50)),
)


def _apply(mutations):
    p = pack(BASE.hm, version=2)
    x = BASE.x.reshape(-1, BASE.x.shape[-1]).copy()
    data, layout, rp, cp = p.data.copy(), p.layout.copy(), p.row_perm.copy(), p.col_perm.copy()
    for mut in mutations:
        kind = mut[0]
        if kind in ("layout_cell", "format_cell", "offset_cell") and layout.shape[0]:
            layout[mut[1] % layout.shape[0], mut[2] % layout.shape[1]] = mut[3]
        elif kind == "data_byte" and data.size:
            data[mut[1] % data.size] = mut[2]
        elif kind == "truncate_data":
            data = data[: mut[1] % (data.size + 1)]
        elif kind == "layout_7_cols":  # a version-1 width
            layout = np.ascontiguousarray(layout[:, :7])
        elif kind == "layout_drop_row" and layout.shape[0]:
            layout = layout[1:]
        elif kind == "layout_dup_row" and layout.shape[0]:
            layout = np.concatenate([layout, layout[-1:]])
        elif kind == "layout_swap_rows" and layout.shape[0] > 1:
            layout = layout[::-1]  # the shape row last
        elif kind == "x_width":
            x = np.resize(x, (x.shape[0], mut[1]))
    return x, data, np.ascontiguousarray(layout), rp, cp


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(mutation, min_size=1, max_size=3), min_size=40, max_size=40))
def test_cpu_kernel_malformed_v2_inputs_fail_cleanly(tmp_path, mutation_sets):
    inputs_list = [_apply(muts) for muts in mutation_sets]
    results = _run_in_subprocess(tmp_path, inputs_list, version=2)
    for muts, inputs, (ok, msg, y) in zip(mutation_sets, inputs_list, results):
        expected, why = _oracle(inputs)
        if expected is None:
            assert not ok, f"{muts}: reference rejected ({why}) but the kernel accepted"
            assert "HMatMul:" in msg, f"{muts}: unexpected error {msg!r}"
        else:
            assert ok, f"{muts}: reference accepted but the kernel failed: {msg}"
            finite = np.isfinite(expected)
            np.testing.assert_array_equal(np.isfinite(y), finite)
            scale = 1 + np.abs(expected[finite]).max(initial=0.0)
            np.testing.assert_allclose(y[finite], expected[finite], rtol=1e-4, atol=1e-4 * scale)


def test_validate_packed_v2_names_the_problem():
    """A few hand-made breakages and the reference's messages."""
    import pytest

    from dehm_onnx.hmatrix import validate_packed

    p = pack(BASE.hm, version=2)
    def broken(fix):
        layout, data = p.layout.copy(), p.data.copy()
        fix(layout, data)
        return data, layout, p.row_perm, p.col_perm
    term = next(i for i, f in enumerate(p.layout[:, FORMATS]) if i and f & 15 == Elem.INT8)
    cases = [
        (lambda l, d: l.__setitem__((1, BYTE_OFFSET), 8), "multiple of 16"),
        (lambda l, d: l.__setitem__((1, FORMATS), 7), "unknown format"),
        (lambda l, d: l.__setitem__((1, FORMATS), format_code(Elem.INT8, Elem.FLOAT32, 48)), "group 48"),
        (lambda l, d: l.__setitem__((1, FORMATS), 1 + 16), "float element"),
        (lambda l, d: d.__setitem__(p.layout[term, BYTE_OFFSET], 0x80), "-128"),
        (lambda l, d: l.__setitem__((1, BYTE_OFFSET), 16 * (p.data.size // 16)), "outside data"),
        (lambda l, d: l.__setitem__((0, 0), 1), "shape row"),
        (lambda l, d: l.__setitem__((1, 0), 0), "unknown kind 0"),
        (lambda l, d: l.__setitem__((1, 2), 10**6), "bad ranges"),
    ]
    for fix, match in cases:
        with pytest.raises(ValueError, match=match):
            validate_packed(*broken(fix))
    with pytest.raises(ValueError, match="layout v2"):
        validate_packed(p.data, p.layout[:, :7], p.row_perm, p.col_perm)
