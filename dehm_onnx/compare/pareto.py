"""Which compared points no other point beats: the Pareto front of size against error.

A point ``p = (size, error)`` is *beaten* by ``q`` when ``q`` is no larger and no less
accurate, and strictly better in one of the two: ``q.size <= p.size``, ``q.error <= p.error``
and ``q != p``. Equal points do not beat each other, so both stay on the front. A point with
a missing (``None``) or NaN coordinate is never on the front and beats nothing; infinities
compare as usual (an infinite error is beaten by every finite error of no larger size).

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


def beats(q, p) -> bool:
    """True when ``q`` is no larger and no less accurate than ``p`` and differs from it.

    Both are ``(size, error)`` pairs of usable numbers.
    """
    return q[0] <= p[0] and q[1] <= p[1] and (q[0] < p[0] or q[1] < p[1])


def pareto_flags(points: Sequence) -> list:
    """One flag per point: True on the front, False when beaten, None when not measured.

    Args:
        points: ``(size, error)`` pairs (``None``, or pairs holding ``None`` or NaN, for
            points that could not be measured).

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
        flags.append(not any(q is not None and j != i and beats(q, p) for j, q in enumerate(usable)))
    return flags
