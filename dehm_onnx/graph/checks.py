"""Why a MatMul/Gemm candidate is left as it was: ``SkipReason`` and the checks producing it.

An ineligible node is not an error: each check returns ``None`` (go on) or a ``Skip`` (a
reason plus the sentence that the report prints).
"""

from __future__ import annotations

import enum
import fnmatch
from dataclasses import dataclass

import numpy as np

__all__ = ["SkipReason", "Skip", "MIN_OPSET", "check_candidate", "check_weight", "check_gain"]

# Emitted Slice/Gather/Concat use axis -1; negative axes are defined from opset 11 on.
MIN_OPSET = 11

_SUPPORTED_DTYPES = (np.float16, np.float32, np.float64)


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


def check_candidate(cand, config, opset: int) -> Skip | None:
    """Node-level checks: name patterns, opset, activation rank."""
    names = (cand.name, cand.weight_name)
    if config.include and not any(fnmatch.fnmatchcase(n, p) for n in names for p in config.include):
        return Skip.of(SkipReason.NOT_INCLUDED)
    for pattern in config.exclude:
        if any(fnmatch.fnmatchcase(n, pattern) for n in names):
            return Skip.of(SkipReason.EXCLUDED, pattern=pattern)
    if opset < MIN_OPSET:
        return Skip.of(SkipReason.OPSET_TOO_OLD, opset=opset, min_opset=MIN_OPSET)
    if cand.const.is_graph_input:
        return Skip.of(SkipReason.WEIGHT_IS_GRAPH_INPUT, weight=cand.weight_name)
    if cand.needs_x_rank and cand.x_rank is None:
        return Skip.of(SkipReason.UNKNOWN_RANK, x=cand.x_name)
    return None


def check_weight(cand, config) -> Skip | None:
    """Weight-level checks: 2-D, dtype, size, finite values."""
    w = cand.const.value
    if w.ndim != 2:
        return Skip.of(SkipReason.NOT_2D, weight=cand.weight_name, shape=list(w.shape))
    if w.dtype.type not in _SUPPORTED_DTYPES:
        return Skip.of(SkipReason.UNSUPPORTED_DTYPE, dtype=w.dtype)
    if min(w.shape) < config.min_size:
        return Skip.of(SkipReason.TOO_SMALL, size=min(w.shape), min_size=config.min_size)
    # An external (memory-mapped) weight is checked when it is compressed, to read it once.
    bad = 0 if isinstance(w, np.memmap) else int(w.size - np.count_nonzero(np.isfinite(w)))
    if bad:
        return Skip.of(SkipReason.NON_FINITE, weight=cand.weight_name, count=bad)
    return None


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
