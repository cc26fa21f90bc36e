"""The registry of emission modes: how a compressed weight becomes ONNX nodes.

Every emitter has the signature::

    emit(hm, x_name, y_name, prefix, dtype) -> (nodes, initializers, functions)

and computes ``y = x @ W_H`` for ``x`` of shape ``(..., m)``, writing its result into the
tensor ``y_name``. ``hm`` is a ``dehm_onnx.hmatrix.HMatrix``; ``dtype`` is the numpy dtype
of the activation (factors are stored in it). Every new tensor, node and initializer name
starts with ``prefix``, which the caller guarantees to be unused in the model. Emitters
never touch a graph: ``dehm_onnx.graph.rewrite`` splices what they return (and tags each
node with its provenance).
"""

from __future__ import annotations

from .emit_custom import emit_custom
from .emit_function import emit_function
from .emit_ops import emit_subgraph

__all__ = ["EMITTERS"]

# The first entry is the standard-op emission that runs on every onnxruntime provider.
EMITTERS = {
    "subgraph": emit_subgraph,
    # One HMatMul node (dehm_onnx/ops/hmatmul.py) plus a standard-op function body:
    # runs everywhere, and runs the compiled kernel where the library is registered.
    "function": emit_function,
    # The HMatMul node alone: needs the compiled library (dehm_onnx.make_session).
    "custom": emit_custom,
}
