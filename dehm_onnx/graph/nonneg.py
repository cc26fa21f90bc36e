"""Which tensors of a model are provably nonnegative: a forward sign analysis.

``nonnegative_tensors(model)`` returns the names of main-graph tensors whose every value is
``>= 0`` (or NaN) for *any* input, from local rules applied in topological order:

* always nonnegative: Abs, Relu, Sqrt, Exp, Sigmoid, Softplus, Softmax, ReduceSumSquare,
  ReduceL1, ReduceL2, Shape, Size;
* ``Mul(a, a)`` (a tensor times itself), ``Pow(a, p)`` with ``p`` a constant of even
  integers, or with ``a`` nonnegative;
* nonnegative when all their (data) inputs are: Add, Sum, Mean, Mul, Div, MatMul, Gemm (with
  ``alpha, beta >= 0``), Min, Concat, Where (both branches), Conv, pooling, the Reduce ops
  that sum, average or pick (ReduceSum/Mean/Max/Min/Prod/LogSumExp excluded), and ops that
  only move or select values (Identity, Reshape, Transpose, Squeeze, Unsqueeze, Flatten,
  Expand, Slice, Gather, Tile, Split, Cast, Pad with a nonnegative constant);
* ``Max`` with any nonnegative input; ``Clip`` with a constant ``min >= 0``;
* constants (initializers, ``Constant`` nodes) whose values are all ``>= 0``.

Anything else (graph inputs, subgraph outputs, unknown ops) is not assumed nonnegative, so the
set is a safe under-approximation. The rewrite uses it to clamp a compressed layer's output at
0 when both its input and its weight are nonnegative (``graph/rewrite.py``): the true output
is then ``>= 0``, and clamping a value whose true result is ``>= 0`` can only reduce its error.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["nonnegative_tensors", "constant_is_nonnegative"]

_ALWAYS = {"Abs", "Relu", "Sqrt", "Exp", "Sigmoid", "Softplus", "Softmax", "ReduceSumSquare", "ReduceL1",
           "ReduceL2", "Shape", "Size"}
_ALL_INPUTS = {"Add", "Sum", "Mean", "Mul", "Div", "MatMul", "Min", "Concat", "Conv", "AveragePool", "MaxPool",
               "GlobalAveragePool", "GlobalMaxPool"}
_FIRST_INPUT = {"Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Expand", "Slice", "Gather",
                "Tile", "Split", "Cast", "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd"}


def constant_is_nonnegative(tensor: onnx.TensorProto) -> bool:
    """True when every value of an in-memory numeric tensor is ``>= 0`` (external data: False)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return False
    try:
        values = numpy_helper.to_array(tensor)
    except Exception:  # noqa: BLE001 - strings, unsupported types
        return False
    if values.dtype.kind not in "fiub":
        return False
    return bool(values.size == 0 or np.all(values >= 0))


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _even_integers(tensor: onnx.TensorProto | None) -> bool:
    if tensor is None or tensor.data_location == onnx.TensorProto.EXTERNAL:
        return False
    values = numpy_helper.to_array(tensor).astype(np.float64)
    return bool(values.size and np.all(np.mod(values, 2.0) == 0.0))


def _node_is_nonnegative(node, nonneg: set, constants: dict) -> bool:
    op = node.op_type
    data = [name for name in node.input if name]
    if node.domain not in ("", "ai.onnx"):
        return False
    if op in _ALWAYS:
        return True
    if op == "Mul" and len(node.input) == 2 and node.input[0] == node.input[1]:
        return True
    if op == "Pow":
        return node.input[0] in nonneg or _even_integers(constants.get(node.input[1]))
    if op in _ALL_INPUTS:
        return bool(data) and all(name in nonneg for name in data)
    if op == "Gemm":
        return _attr(node, "alpha", 1.0) >= 0 and _attr(node, "beta", 1.0) >= 0 and all(n in nonneg for n in data)
    if op in _FIRST_INPUT:
        return bool(data) and node.input[0] in nonneg
    if op == "Max":
        return any(name in nonneg for name in data)
    if op == "Clip":
        low = node.input[1] if len(node.input) > 1 and node.input[1] else None
        return node.input[0] in nonneg or (low is not None and low in nonneg and low in constants)
    if op == "Where":
        return len(node.input) == 3 and node.input[1] in nonneg and node.input[2] in nonneg
    if op == "Pad":
        mode = _attr(node, "mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        value = node.input[2] if len(node.input) > 2 and node.input[2] else None
        return node.input[0] in nonneg and (mode != "constant" or value is None or value in nonneg)
    return False


class _Signs:
    """The set being built: computed names, plus constants checked on first use only."""

    def __init__(self, constants: dict):
        self.constants = constants
        self.names: set = set()
        self.checked: dict = {}

    def __contains__(self, name: str) -> bool:
        if name in self.names:
            return True
        if name in self.constants:
            if name not in self.checked:
                self.checked[name] = constant_is_nonnegative(self.constants[name])
            return self.checked[name]
        return False


def nonnegative_tensors(model: onnx.ModelProto) -> set:
    """Names of the main-graph tensors that are ``>= 0`` whatever the inputs (see module doc).

    A constant's values are decoded only when a rule needs its sign (so a weight is read only
    when the other input of its MatMul is already known to be nonnegative), and never from
    external data files.
    """
    graph = model.graph
    inputs = {i.name for i in graph.input}
    constants = {t.name: t for t in graph.initializer if t.name not in inputs}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = node.attribute[0].t
    signs = _Signs(constants)
    for node in graph.node:  # nodes are topologically sorted
        if node.op_type != "Constant" and _node_is_nonnegative(node, signs, constants):
            signs.names.update(o for o in node.output if o)
    return signs.names | {name for name, ok in signs.checked.items() if ok}
