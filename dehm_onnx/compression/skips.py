"""Why a layer is left dense: ``SkipReason``, ``Skip`` and the gain check.

An ineligible layer is not an error: a check returns ``None`` (go on) or a ``Skip`` (a
reason plus the sentence that the report prints).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["SkipReason", "Skip", "check_gain"]


class SkipReason(enum.Enum):
    """A reason to leave a layer dense; the value is the sentence template."""

    NOT_INCLUDED = "node and weight names match no --include pattern"
    EXCLUDED = "node or weight name matches --exclude pattern {pattern!r}"
    OPSET_TOO_OLD = "model opset {opset} < {min_opset} (emitted ops use negative axes)"
    WEIGHT_IS_GRAPH_INPUT = "weight {weight!r} is a graph input and may be replaced at run time"
    NOT_2D = "weight {weight!r} is not 2-D (shape {shape})"
    UNSUPPORTED_DTYPE = "weight dtype {dtype} is not float16, float32 or float64"
    UNKNOWN_RANK = "rank of activation {x!r} is unknown (needed to transpose W @ X)"
    TOO_SMALL = "min(rows, cols) = {size} < min_size {min_size}"
    NON_FINITE = "weight {weight!r} has {count} NaN/Inf entries"
    SHARED_WEIGHT = "weight {weight!r} is also used by {users}, which stay(s) dense"
    NOT_SMALLER = "compressed form would store {params} >= {dense} parameters at tol {tol:g}"
    LITTLE_GAIN = "compressed form would store {params} of {dense} parameters ({ratio:.3f} > max_ratio {max_ratio:g})"
    COMPRESSION_FAILED = "compression failed: {error}"

    def sentence(self, **fields) -> str:
        return self.value.format(**fields)


@dataclass(frozen=True)
class Skip:
    """A skip reason and its sentence."""

    reason: SkipReason
    sentence: str

    @classmethod
    def of(cls, reason: SkipReason, **fields) -> "Skip":
        return cls(reason, reason.sentence(**fields))


def check_gain(hm, tol: float, max_ratio: float = 1.0) -> Skip | None:
    """Skip unless the compressed form stores fewer parameters than the dense weight, and at
    most ``max_ratio`` of them."""
    if hm.params >= hm.dense_params:
        return Skip.of(SkipReason.NOT_SMALLER, params=hm.params, dense=hm.dense_params, tol=tol)
    if hm.params > max_ratio * hm.dense_params:
        return Skip.of(
            SkipReason.LITTLE_GAIN, params=hm.params, dense=hm.dense_params, ratio=hm.ratio, max_ratio=max_ratio
        )
    return None
