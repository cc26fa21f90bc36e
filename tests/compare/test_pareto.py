"""Pareto marking: the points no other point beats on size and error."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from dehm_onnx.compare.core import PARETO_ERROR_TIES, _mark_pareto
from dehm_onnx.compare.pareto import beats, pareto_flags


def test_pareto_flags_on_a_hand_made_set():
    points = [
        (100, 0.0),  # the original: exact, largest -> on the front
        (10, 1e-2),  # on the front
        (20, 1e-2),  # beaten by (10, 1e-2): larger, same error
        (10, 1e-3),  # beats (10, 1e-2): same size, smaller error
        (5, 1e-1),  # smallest -> on the front
        (50, 1e-4),  # on the front
        (60, 1e-3),  # beaten by (10, 1e-3) and (50, 1e-4)
    ]
    assert pareto_flags(points) == [True, False, False, True, True, True, False]


def test_pareto_ties_stay_on_the_front_together():
    # Two identical points (e.g. a method that left the model unchanged, beside the original).
    assert pareto_flags([(100, 0.0), (100, 0.0), (100, 1e-3)]) == [True, True, False]
    # Equal size, equal error, one of them beaten by a third point: both beaten.
    assert pareto_flags([(10, 1e-2), (10, 1e-2), (9, 1e-2)]) == [False, False, True]


def test_pareto_unmeasured_points_are_none_and_beat_nothing():
    nan = float("nan")
    flags = pareto_flags([(10, 1e-3), None, (5, nan), (None, 1e-9), (20, 1e-2), (1, math.inf)])
    # NaN/None never on the front and never beating: (20, 1e-2) is beaten by (10, 1e-3) only.
    assert flags == [True, None, None, None, False, True]
    # An infinite error is beaten by any finite error of no larger size.
    assert pareto_flags([(5, math.inf), (5, 1.0)]) == [False, True]


def test_beats_needs_no_worse_in_both_and_better_in_one():
    assert beats((1, 1), (2, 1)) and beats((1, 1), (1, 2)) and beats((1, 1), (2, 2))
    assert not beats((1, 1), (1, 1))
    assert not beats((1, 3), (2, 2)) and not beats((3, 1), (2, 2))


_finite = st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False)


@given(st.lists(st.tuples(st.integers(1, 50), _finite), max_size=25))
def test_pareto_front_is_exactly_the_unbeaten_points(points):
    flags = pareto_flags(points)
    front = [p for p, f in zip(points, flags) if f]
    for p, flag in zip(points, flags):
        beaten = any(beats(q, p) for q in points)
        assert flag == (not beaten)
        if beaten:  # dominance is transitive: some front point beats every beaten point
            assert any(beats(q, p) for q in front)
    if points:
        assert front  # a non-empty finite set always has a front
        # the smallest point with the least error among the smallest is always on it
        smallest = min(points)
        assert smallest in front


def test_pareto_error_ties_absorb_rounding_noise():
    # The same layer by standard ops (err 3.6700e-4) and by the compiled kernel (3.6702e-4):
    # exactly compared, the larger ops file stays on the front; with the tie it is beaten.
    ops, kernel = (120_000, 3.6700e-4), (80_000, 3.6702e-4)
    assert pareto_flags([ops, kernel]) == [True, True]
    assert pareto_flags([ops, kernel], rel_tie=1e-2) == [False, True]
    # A clearly smaller error still counts at the same size, and rounding of an exact model
    # (0 against 5e-7) is a tie within abs_tie.
    assert pareto_flags([(10, 1e-3), (10, 0.9e-3)], rel_tie=1e-2) == [False, True]
    assert pareto_flags([(100, 0.0), (100, 5e-7)], abs_tie=1e-6) == [True, True]
    assert pareto_flags([(100, 0.0), (90, 5e-7)], abs_tie=1e-6) == [False, True]
    # ties never make a finite error lose to an infinite one, nor the reverse
    assert pareto_flags([(5, math.inf), (5, 1.0)], 1e-2, 1e-6) == [False, True]


@given(st.lists(st.tuples(st.integers(1, 50), _finite), max_size=25), st.sampled_from([0.0, 1e-2]), st.sampled_from([0.0, 1e-6]))
def test_pareto_with_ties_is_antisymmetric_and_flags_the_unbeaten(points, rel_tie, abs_tie):
    flags = pareto_flags(points, rel_tie, abs_tie)
    for p, flag in zip(points, flags):
        assert flag == (not any(beats(q, p, rel_tie, abs_tie) for q in points))
        for q in points:
            assert not (beats(q, p, rel_tie, abs_tie) and beats(p, q, rel_tie, abs_tie))
    if points:
        assert any(flags)  # the smallest point with the least error among the smallest is unbeaten


def test_mark_pareto_on_rows_uses_file_bytes_and_output_error():
    rel_tie, _ = PARETO_ERROR_TIES
    rows = [
        {"method": "original", "file_bytes": 1000, "output_rel_error": 0.0},
        {"method": "dehm@1e-02", "file_bytes": 200, "output_rel_error": 1e-3},
        {"method": "nbits8", "file_bytes": 280, "output_rel_error": 5e-3},
        {"method": "nbits4", "file_bytes": 150, "output_rel_error": 8e-2},
        {"method": "int8", "file_bytes": None, "output_rel_error": None},
        # the same layer in standard ops: larger, and more accurate only by rounding noise
        {"method": "dehm-ops@1e-02", "file_bytes": 300, "output_rel_error": 1e-3 * (1 - rel_tie / 4)},
    ]
    _mark_pareto(rows)
    assert [r["pareto"] for r in rows] == [True, True, False, True, None, False]
