"""Custom emission: one ``HMatMul`` node per layer, nothing else.

    y = HMatMul(x, data, layout, row_perm, col_perm)

The contract is ``dehm_onnx/ops/hmatmul.py``; the weights are the four packed arrays
of ``dehm_onnx/hmatrix/pack.py``: layout version 1 (``data`` in the activation dtype) when
every stored array is in the weight's dtype, else layout version 2 (``data`` uint8, every
array kept in its float16/int8/int4 storage, so the file keeps the bytes the engine saved).
Running the model needs the compiled library (``dehm_onnx.make_session``); use ``function``
for a file that also runs on stock onnxruntime.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from .emit_function import SUPPORTED_DTYPES, hmatmul_node, packed_inputs, packed_inputs_v2
from .emit_ops import Emission, emit_ops

__all__ = ["emit_custom"]

logger = logging.getLogger(__name__)


def emit_custom(hm, x: ir.Value, prefix: str, dtype, context=None) -> Emission:
    """Emit ``x @ W_H`` as a single ``HMatMul`` node (the ops emission for unsupported dtypes)."""
    dtype = np.dtype(dtype)
    if dtype not in SUPPORTED_DTYPES:
        logger.info("HMatMul does not support %s; %r uses the ops emission", dtype, prefix)
        return emit_ops(hm, x, prefix, dtype, context)
    packed = packed_inputs(hm, prefix, dtype) if all(b.is_float for b in hm.blocks) else packed_inputs_v2(hm, prefix)
    node = hmatmul_node(x, prefix, packed)
    return Emission([node], packed, node.outputs[0], family="custom", inputs=list(packed))
