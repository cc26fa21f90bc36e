"""Custom emission: one ``HMatMul`` node per layer, nothing else.

    y = HMatMul(x, data, layout, row_perm, col_perm)

The contract is ``dehm_onnx/ops/hmatmul.py``; the weights are the four packed arrays
of ``dehm_onnx/hmatrix/pack.py``. Running the model needs the compiled library
(``dehm_onnx.make_session``); use ``function`` for a file that also runs on stock
onnxruntime.
"""

from __future__ import annotations

import logging

import numpy as np

from .emit_function import SUPPORTED_DTYPES, hmatmul_node, packed_inputs
from .emit_ops import emit_subgraph

__all__ = ["emit_custom"]

logger = logging.getLogger(__name__)


def emit_custom(hm, x_name: str, y_name: str, prefix: str, dtype):
    """Emit ``y = x @ W_H`` as a single ``HMatMul`` node (subgraph for unsupported dtypes)."""
    dtype = np.dtype(dtype)
    if dtype not in SUPPORTED_DTYPES:
        logger.info("HMatMul does not support %s; %r uses the subgraph emission", dtype, prefix)
        return emit_subgraph(hm, x_name, y_name, prefix, dtype)
    inits, names = packed_inputs(hm, prefix, dtype)
    return [hmatmul_node(x_name, y_name, prefix, names)], inits, []
