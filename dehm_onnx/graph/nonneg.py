"""Which tensors of a model are provably nonnegative: a forward sign analysis (on onnx-ir).

``nonnegative_tensors(model)`` returns the names of main-graph tensors whose every value is
``>= 0`` (or NaN) for *any* input, from local rules applied in topological order:

* always nonnegative: Abs, Relu, Sqrt, Exp, Sigmoid, Softplus, Softmax, ReduceSumSquare,
  ReduceL1, ReduceL2, Shape, Size;
* ``Mul(a, a)`` (a tensor times itself), ``Pow(a, p)`` with ``p`` a constant of even
  integers, or with ``a`` nonnegative;
* nonnegative when all their (data) inputs are: Add, Sum, Mean, Mul, Div, MatMul, Gemm (with
  ``alpha, beta >= 0``), Min, Concat, Where (both branches), Conv, pooling, and ops that only
  move, select or sum values (Identity, Reshape, Transpose, Squeeze, Unsqueeze, Flatten,
  Expand, Slice, Gather, Tile, Split, Cast, ReduceSum/Mean/Max/Min/Prod, Pad with a
  nonnegative constant);
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
import onnx_ir as ir

from .sources import constant_tensor

__all__ = ["nonnegative_tensors", "constant_is_nonnegative"]

_ALWAYS = {"Abs", "Relu", "Sqrt", "Exp", "Sigmoid", "Softplus", "Softmax", "ReduceSumSquare", "ReduceL1",
           "ReduceL2", "Shape", "Size"}
_ALL_INPUTS = {"Add", "Sum", "Mean", "Mul", "Div", "MatMul", "Min", "Concat", "Conv", "AveragePool", "MaxPool",
               "GlobalAveragePool", "GlobalMaxPool"}
_FIRST_INPUT = {"Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Expand", "Slice", "Gather",
                "Tile", "Split", "Cast", "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd"}


def constant_is_nonnegative(tensor) -> bool:
    """True when every value of an in-memory numeric tensor is ``>= 0`` (external data: False)."""
    if tensor is None or isinstance(tensor, ir.ExternalTensor):
        return False
    try:
        values = tensor.numpy()
    except Exception:  # noqa: BLE001 - strings, unsupported types
        return False
    if values.dtype.kind not in "fiub":
        return False
    return bool(values.size == 0 or np.all(values >= 0))


def _even_integers(value: ir.Value | None) -> bool:
    tensor = constant_tensor(value)
    if tensor is None or isinstance(tensor, ir.ExternalTensor):
        return False
    values = tensor.numpy().astype(np.float64)
    return bool(values.size and np.all(np.mod(values, 2.0) == 0.0))


class _Signs:
    """The set being built: computed values, plus constants checked on first use only."""

    def __init__(self):
        self.values: set[int] = set()
        self.names: set[str] = set()
        self.checked: dict[int, bool] = {}

    def __contains__(self, value: ir.Value | None) -> bool:
        if value is None:
            return False
        if id(value) in self.values:
            return True
        if id(value) not in self.checked:
            ok = constant_is_nonnegative(constant_tensor(value))
            self.checked[id(value)] = ok
            if ok:
                self.names.add(value.name)
        return self.checked[id(value)]

    def add(self, node: ir.Node) -> None:
        for value in node.outputs:
            if value.name:
                self.values.add(id(value))
                self.names.add(value.name)


def _node_is_nonnegative(node: ir.Node, signs: _Signs) -> bool:
    op = node.op_type
    data = [v for v in node.inputs if v is not None]
    first = node.inputs[0] if node.inputs else None
    if node.domain not in ("", "ai.onnx"):
        return False
    if op in _ALWAYS:
        return True
    if op == "Mul" and len(node.inputs) == 2 and node.inputs[0] is node.inputs[1]:
        return True
    if op == "Pow":
        return first in signs or _even_integers(node.inputs[1] if len(node.inputs) > 1 else None)
    if op in _ALL_INPUTS:
        return bool(data) and all(v in signs for v in data)
    if op == "Gemm":
        alpha = node.attributes.get_float("alpha", 1.0)
        beta = node.attributes.get_float("beta", 1.0)
        return alpha >= 0 and beta >= 0 and all(v in signs for v in data)
    if op in _FIRST_INPUT:
        return bool(data) and first in signs
    if op == "Max":
        return any(v in signs for v in data)
    if op == "Clip":
        low = node.inputs[1] if len(node.inputs) > 1 else None
        return first in signs or (low is not None and constant_tensor(low) is not None and low in signs)
    if op == "Where":
        return len(node.inputs) == 3 and node.inputs[1] in signs and node.inputs[2] in signs
    if op == "Pad":
        mode = node.attributes.get_string("mode", "constant")
        value = node.inputs[2] if len(node.inputs) > 2 else None
        return first in signs and (mode != "constant" or value is None or value in signs)
    return False


def nonnegative_values(model: ir.Model) -> set[str]:
    """Names of the main-graph values that are ``>= 0`` whatever the inputs (see module doc).

    A constant's values are decoded only when a rule needs its sign (so a weight is read only
    when the other input of its MatMul is already known to be nonnegative), and never from
    external data files.
    """
    signs = _Signs()
    for node in model.graph:  # nodes are topologically sorted
        if node.op_type != "Constant" and _node_is_nonnegative(node, signs):
            signs.add(node)
    return set(signs.names)


def nonnegative_tensors(model) -> set[str]:
    """``nonnegative_values`` of an ``ir.Model`` or an ``onnx.ModelProto``."""
    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)
    return nonnegative_values(model)
