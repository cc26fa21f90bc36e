"""Which compared points no other point beats: the Pareto front of size against error.

A point ``p = (size, error)`` is *beaten* by ``q`` when ``q`` is no larger and no less
accurate, and strictly better in one of the two: ``q.size <= p.size``, ``q.error <= p.error``
and ``q != p``. Equal points do not beat each other, so both stay on the front. A point with
a missing (``None``) or NaN coordinate is never on the front and beats nothing; infinities
compare as usual (an infinite error is beaten by every finite error of no larger size).

Errors measured on a finite calibration set are not exact: the same product evaluated by
two kernels (standard ops, the compiled kernel, onnxruntime's fusions) differs by float
rounding. With ``rel_tie``/``abs_tie``, two finite errors that differ by at most
``rel_tie * max(e1, e2) + abs_tie`` count as equal, so rounding noise neither beats a point
nor saves it. Sizes are exact (bytes) and compare exactly.

Pure Python: no numpy, no onnx.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["beats", "pareto_flags"]


def _usable(point) -> bool:
    if point is None or len(point) != 2:
        return False
    return all(v is not None and not (isinstance(v, float) and math.isnan(v)) for v in point)


def _tie(e1: float, e2: float, rel_tie: float, abs_tie: float) -> float:
    if not (math.isfinite(e1) and math.isfinite(e2)):
        return 0.0
    return rel_tie * max(abs(e1), abs(e2)) + abs_tie


def beats(q, p, rel_tie: float = 0.0, abs_tie: float = 0.0) -> bool:
    """True when ``q`` is no larger and no less accurate than ``p`` and better in one.

    Both are ``(size, error)`` pairs of usable numbers; errors within the tie (see the module
    docstring) count as equal.
    """
    tie = _tie(q[1], p[1], rel_tie, abs_tie)
    no_worse = q[0] <= p[0] and q[1] <= p[1] + tie
    return no_worse and (q[0] < p[0] or q[1] < p[1] - tie)


def pareto_flags(points: Sequence, rel_tie: float = 0.0, abs_tie: float = 0.0) -> list:
    """One flag per point: True on the front (beaten by no other point), False when beaten,
    None when not measured.

    Args:
        points: ``(size, error)`` pairs (``None``, or pairs holding ``None`` or NaN, for
            points that could not be measured).
        rel_tie, abs_tie: errors this close count as equal (default: exact comparison).

    Returns:
        A list as long as ``points``. O(n²), which is fine for the tens of rows a
        comparison has.
    """
    usable = [p if _usable(p) else None for p in points]
    flags = []
    for i, p in enumerate(usable):
        if p is None:
            flags.append(None)
            continue
        flags.append(not any(q is not None and j != i and beats(q, p, rel_tie, abs_tie) for j, q in enumerate(usable)))
    return flags
