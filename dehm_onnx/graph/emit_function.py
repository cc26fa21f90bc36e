"""Function emission: one ``HMatMul`` node per layer plus a model-local function body.

    y = HMatMul(x, data, layout, row_perm, col_perm)    (node.overload = the layer's prefix)

The node follows the op contract in ``dehm_onnx/ops/hmatmul.py``; the four packed arrays
(``dehm_onnx/hmatrix/pack.py``) are the layer's only weight initializers. The model also
gets a ``FunctionProto`` with the same domain, name and overload (model IR version 10)
whose body computes the same product with standard ops:

- stock onnxruntime inlines the body, so the file runs everywhere;
- with the custom-op library registered (``dehm_onnx.make_session``), the compiled kernel
  runs instead, for every overload.

The body is the ``ops`` emission (``emit_ops``) of the same H-matrix with each factor
initializer replaced by ``Reshape(Slice(data, offset, offset + size))`` of the function's
``data`` input (stacked factors by a ``Concat`` of such slices), so the weights are stored
once. These nodes depend only on ``data``, an initializer, and onnxruntime folds them into
constants when the session is created. Index constants become ``Constant`` nodes.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from ..hmatrix import BlockKind, pack
from ..ops import hmatmul
from .emit_ops import Emission, emit_ops, initializer

__all__ = ["emit_function", "fit_function_to_model", "FUNCTION_OPSET", "SUPPORTED_DTYPES", "FUNCTION_IR_VERSION"]

logger = logging.getLogger(__name__)

# Default-domain opset the bodies are written for (every op used is unchanged since 13);
# ``fit_function_to_model`` sets it to the model's own version, as the checker requires.
FUNCTION_OPSET = 13
# Node overloads and overloaded model-local functions need IR version 10.
FUNCTION_IR_VERSION = 10
SUPPORTED_DTYPES = hmatmul.SUPPORTED_DTYPES


def packed_inputs(hm, prefix: str, dtype) -> list[ir.Value]:
    """The four packed initializers of ``hm`` (``data`` stored in ``dtype``), in input order,
    named as ``dehm_onnx.ops.hmatmul.packed_initializers`` names them."""
    packed = pack(hm)
    arrays = (packed.data.astype(dtype), packed.layout, packed.row_perm, packed.col_perm)
    return [initializer(f"{prefix}.{field}", a) for a, field in zip(arrays, hmatmul.INPUTS[1:])]


def hmatmul_node(x: ir.Value, prefix: str, packed: list[ir.Value], overload: str = "") -> ir.Node:
    """The layer's ``HMatMul`` node (contract: ``dehm_onnx.ops.hmatmul``)."""
    name = f"{prefix}/hmatmul"
    return ir.node(
        hmatmul.OP_TYPE, [x, *packed], domain=hmatmul.DOMAIN, overload=overload, name=name,
        outputs=[ir.Value(name=f"{prefix}/y")],
    )


class _FactorIndex:
    """Finds a stacked factor matrix as a run of contiguous ranges of the packed ``data``."""

    def __init__(self, hm, dtype):
        packed = pack(hm)
        self.by_first_row: dict[tuple[int, bytes], list[tuple[int, np.ndarray]]] = {}
        for kind, r0, r1, c0, c1, rank, off in packed.layout.tolist():
            rows, cols = r1 - r0, c1 - c0
            if kind == BlockKind.DENSE:
                self._add(off, packed.data[off : off + rows * cols].reshape(rows, cols), dtype)
            elif kind == BlockKind.LOWRANK and rank > 0:
                self._add(off, packed.data[off : off + rows * rank].reshape(rows, rank), dtype)
                vt_off = off + rows * rank
                self._add(vt_off, packed.data[vt_off : vt_off + rank * cols].reshape(rank, cols), dtype)

    def _add(self, offset: int, factor: np.ndarray, dtype) -> None:
        factor = factor.astype(dtype)
        key = (factor.shape[1], factor[0].tobytes())
        self.by_first_row.setdefault(key, []).append((offset, factor))

    def pieces(self, array: np.ndarray):
        """``[(offset, shape), ...]`` whose row-stacking equals ``array`` exactly, or None."""
        if array.ndim != 2 or array.shape[0] == 0:
            return None
        out, pos = [], 0
        while pos < array.shape[0]:
            for offset, factor in self.by_first_row.get((array.shape[1], array[pos].tobytes()), []):
                end = pos + factor.shape[0]
                if end <= array.shape[0] and np.array_equal(array[pos:end], factor):
                    out.append((offset, factor.shape))
                    pos = end
                    break
            else:
                return None
        return out


class _BodyBuilder:
    """Makes the ops emission's initializers the outputs of function-body nodes."""

    def __init__(self, index: _FactorIndex, data: ir.Value):
        self.index = index
        self.data = data
        self.nodes: list[ir.Node] = []
        self.copied = 0  # float values stored again because no factor matched

    def const(self, value: ir.Value | str, array: np.ndarray) -> ir.Value:
        """A ``Constant`` node writing ``array`` into ``value`` (a new value for a name)."""
        out = ir.Value(name=value) if isinstance(value, str) else value
        tensor = ir.tensor(np.ascontiguousarray(array), name=out.name)
        self.nodes.append(ir.node("Constant", [], {"value": tensor}, outputs=[out], name=""))
        return out

    def factor(self, value: ir.Value, array: np.ndarray) -> None:
        pieces = self.index.pieces(array)
        if pieces is None:
            if np.any(array):
                self.copied += array.size
            self.const(value, array)
            return
        parts = []
        for i, (offset, shape) in enumerate(pieces):
            size = shape[0] * shape[1]
            stem = value.name if len(pieces) == 1 else f"{value.name}/part{i}"
            start = self.const(f"{stem}/start", np.array([offset], np.int64))
            end = self.const(f"{stem}/end", np.array([offset + size], np.int64))
            dims = self.const(f"{stem}/shape", np.array(shape, np.int64))
            flat = ir.node("Slice", [self.data, start, end], outputs=[ir.Value(name=f"{stem}/flat")], name="")
            out = value if len(pieces) == 1 else ir.Value(name=stem)
            self.nodes += [flat, ir.node("Reshape", [flat.outputs[0], dims], outputs=[out], name="")]
            parts.append(out)
        if len(parts) > 1:
            self.nodes.append(ir.node("Concat", parts, {"axis": 0}, outputs=[value], name=""))


def function_body(hm, prefix: str, dtype, overload: str) -> ir.Function:
    """The model-local function ``ai.dehm.HMatMul`` (this overload) computing ``X @ W_H``."""
    inputs = [ir.Value(name=name) for name in hmatmul.INPUTS]
    emission = emit_ops(hm, inputs[0], prefix, dtype)
    body = _BodyBuilder(_FactorIndex(hm, dtype), inputs[1])
    for value in emission.initializers:
        array = value.const_value.numpy()
        value.const_value = None  # the value becomes a body node's output
        if np.issubdtype(array.dtype, np.floating):
            body.factor(value, array)
        else:
            body.const(value, array)
    if body.copied:
        logger.info("function body of %r repeats %d weight values not found in the packed data", prefix, body.copied)
    (y_name,) = hmatmul.OUTPUTS
    emission.output.name = y_name
    graph = ir.Graph(
        inputs, [emission.output], nodes=body.nodes + emission.nodes, opset_imports={"": FUNCTION_OPSET},
        name=hmatmul.OP_TYPE,
    )
    return ir.Function(hmatmul.DOMAIN, hmatmul.OP_TYPE, overload, graph=graph, attributes=[])


def fit_function_to_model(model: ir.Model, function: ir.Function) -> None:
    """Make a function body from this module valid in ``model`` (called when splicing).

    The ONNX checker requires a function's opset imports to equal the model's for the same
    domain, and overloads need IR version 10, so both are raised to match the model.
    """
    for domain in list(function.opset_imports):
        if domain in model.opset_imports:
            function.opset_imports[domain] = model.opset_imports[domain]
    if model.ir_version < FUNCTION_IR_VERSION:
        model.ir_version = FUNCTION_IR_VERSION


def emit_function(hm, x: ir.Value, prefix: str, dtype) -> Emission:
    """Emit ``x @ W_H`` as one ``HMatMul`` node plus its model-local function body.

    For activation dtypes the op does not support (anything but float32/float16) this
    falls back to the ``ops`` emission.
    """
    dtype = np.dtype(dtype)
    if dtype not in SUPPORTED_DTYPES:
        logger.info("HMatMul does not support %s; %r uses the ops emission", dtype, prefix)
        return emit_ops(hm, x, prefix, dtype)
    packed = packed_inputs(hm, prefix, dtype)
    node = hmatmul_node(x, prefix, packed, overload=prefix)
    return Emission([node], packed, node.outputs[0], [function_body(hm, prefix, dtype, prefix)])
