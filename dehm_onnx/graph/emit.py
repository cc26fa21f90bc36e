"""The registry of emission modes: how a compressed weight becomes ONNX nodes.

Every emitter has the signature::

    emit(hm, x, prefix, dtype, context=None) -> Emission(nodes, initializers, output, functions, ...)

and computes ``x @ W_H`` for the ``ir.Value`` ``x`` of shape ``(..., m)`` into
``Emission.output``. ``hm`` is a ``dehm_onnx.hmatrix.HMatrix``; ``dtype`` is the numpy dtype
of the activation; ``context`` (``EmitContext``) gives the activation's rank, the model's
opset and whether integer arrays may use onnxruntime's quantized kernel. Every new tensor, node and initializer name
starts with ``prefix``, which the caller guarantees to be unused in the model. Emitters
never touch a graph: ``dehm_onnx.graph.rewrite`` splices what they return (and tags each
node with its provenance). The names of the modes are ``dehm_onnx.config.EMIT_MODES``.
"""

from __future__ import annotations

from .emit_custom import emit_custom
from .emit_function import emit_function
from .emit_ops import Emission, EmitContext, emit_ops

__all__ = ["EMITTERS", "Emission", "EmitContext"]

# The first entry is the standard-op emission that runs on every onnxruntime provider.
EMITTERS = {
    "ops": emit_ops,
    # One HMatMul node (dehm_onnx/ops/hmatmul.py) plus its standard-op function body:
    # stock onnxruntime runs the body, the compiled library the node (layout v1, or v2
    # decoded in the body by the model-local ai.dehm.Decode* functions).
    "function": emit_function,
    # The HMatMul node alone (layout v1, or v2 for quantized arrays): needs the compiled
    # library (dehm_onnx.make_session).
    "custom": emit_custom,
    # The default: the cost model's choice per layer (today always standard ops, which run on
    # stock runtimes; custom needs the library).
    "auto": emit_ops,
}


def layer_model(hm, mode: str, x_shape, dtype, prefix: str = "w.hm", opset: int = 17, context: EmitContext | None = None):
    """A one-layer ``onnx.ModelProto`` ``Y = X @ W_H`` from one emitter, assembled as the pass
    splices it (functions fitted to the model, the ``ai.dehm`` opset imported when used).

    Args:
        hm: the H-matrix.
        mode: a key of ``EMITTERS``.
        x_shape: shape of ``X`` (ints or symbolic names); ``Y`` has ``X``'s leading dims.
        dtype: the activation dtype.
        prefix: the prefix of every new name.
        opset: the default-domain opset.
        context: the emission context (default: ``x``'s rank and ``opset``, no fused integers).
    """
    import numpy as np
    import onnx_ir as ir

    from ..ops import hmatmul
    from .emit_function import fit_function_to_model

    elem = ir.DataType.from_numpy(np.dtype(dtype))
    x = ir.Value(name=hmatmul.INPUTS[0], type=ir.TensorType(elem), shape=ir.Shape(list(x_shape)))
    context = context or EmitContext(x_rank=len(list(x_shape)), opset=opset)
    emission = EMITTERS[mode](hm, x, prefix, dtype, context)
    y = emission.output
    y.name, y.type, y.shape = hmatmul.OUTPUTS[0], ir.TensorType(elem), ir.Shape([*list(x_shape)[:-1], hm.shape[1]])
    graph = ir.Graph(
        [x], [y], nodes=emission.nodes, initializers=emission.initializers,
        opset_imports={"": opset, hmatmul.DOMAIN: hmatmul.VERSION}, name=mode,
    )
    model = ir.Model(graph, ir_version=10)
    for function in emission.functions:
        fit_function_to_model(model, function)
        model.functions[function.identifier()] = function
    return ir.serde.serialize_model(model)
