"""The checks that leave a MatMul/Gemm candidate as it was, before anything is compressed.

An ineligible node is not an error: each check returns ``None`` (go on) or a ``Skip``
(``dehm_onnx.compression.skips``: a reason plus the sentence that the report prints). The
checks read names, shapes and dtypes only, never a weight's values: NaN/Inf entries are
found where the weight is compressed (``dehm_onnx.compression.parallel``).
"""

from __future__ import annotations

import fnmatch

import numpy as np

from ..compression.skips import Skip, SkipReason

__all__ = ["MIN_OPSET", "check_candidate", "check_weight"]

# Emitted Slice/Gather/Concat use axis -1; negative axes are defined from opset 11 on.
MIN_OPSET = 11

_SUPPORTED_DTYPES = (np.float16, np.float32, np.float64)


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
    if cand.source.is_graph_input:
        return Skip.of(SkipReason.WEIGHT_IS_GRAPH_INPUT, weight=cand.weight_name)
    if cand.needs_x_rank and cand.x_rank is None:
        return Skip.of(SkipReason.UNKNOWN_RANK, x=cand.x_name)
    return None


def check_weight(cand, config) -> Skip | None:
    """Weight-level checks: 2-D, dtype, size."""
    shape, dtype = cand.source.shape, cand.source.dtype
    if len(shape) != 2:
        return Skip.of(SkipReason.NOT_2D, weight=cand.weight_name, shape=list(shape))
    if dtype.type not in _SUPPORTED_DTYPES:
        return Skip.of(SkipReason.UNSUPPORTED_DTYPE, dtype=dtype)
    if min(shape) < config.min_size:
        return Skip.of(SkipReason.TOO_SMALL, size=min(shape), min_size=config.min_size)
    return None
