"""Function emission: one ``HMatMul`` node per layer plus a model-local function body.

    y = HMatMul(x, data, layout, row_perm, col_perm)    (node.overload = the layer's prefix)

The node follows the op contract in ``dehm_onnx/ops/hmatmul.py``; the four packed arrays
(``dehm_onnx/hmatrix/pack.py``) are the layer's only weight initializers. The model also
gets a ``FunctionProto`` with the same domain, name and overload (model IR version 10)
whose body computes the same product with standard ops:

- stock onnxruntime inlines the body, so the file runs everywhere;
- with the custom-op library registered (``dehm_onnx.make_session``), the compiled kernel
  runs instead, for every overload.

The body is the ``subgraph`` emission (``emit_ops``) of the same H-matrix with each factor
initializer replaced by ``Reshape(Slice(data, offset, offset + size))`` of the function's
``data`` input (stacked factors by a ``Concat`` of such slices), so the weights are stored
once. These nodes depend only on ``data``, an initializer, and onnxruntime folds them into
constants when the session is created. Index constants become ``Constant`` nodes.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..hmatrix import BlockKind, pack
from ..ops import hmatmul
from .emit_ops import emit_subgraph

__all__ = ["emit_function", "fit_function_to_model", "FUNCTION_OPSET", "SUPPORTED_DTYPES", "FUNCTION_IR_VERSION"]

logger = logging.getLogger(__name__)

# Default-domain opset the bodies are written for (every op used is unchanged since 13);
# ``fit_function_to_model`` sets it to the model's own version, as the checker requires.
FUNCTION_OPSET = 13
# Node overloads and overloaded model-local functions need IR version 10.
FUNCTION_IR_VERSION = 10
SUPPORTED_DTYPES = hmatmul.SUPPORTED_DTYPES


def packed_inputs(hm, prefix: str, dtype):
    """The four packed initializers of ``hm`` (stored in ``dtype``) and their names."""
    inits = hmatmul.packed_initializers(pack(hm), prefix, dtype=dtype)
    return inits, [t.name for t in inits]


def hmatmul_node(x_name: str, y_name: str, prefix: str, names, overload: str = "") -> onnx.NodeProto:
    """The layer's ``HMatMul`` node."""
    return hmatmul.make_hmatmul_node(x_name, names, y_name, name=f"{prefix}/hmatmul", overload=overload)


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
    """Turns the subgraph emission's initializers into function-body nodes."""

    def __init__(self, index: _FactorIndex):
        self.index = index
        self.nodes: list[onnx.NodeProto] = []
        self.copied = 0  # float values stored again because no factor matched

    def const(self, name: str, value: np.ndarray) -> None:
        self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name)))

    def factor(self, name: str, value: np.ndarray) -> None:
        pieces = self.index.pieces(value)
        if pieces is None:
            if np.any(value):
                self.copied += value.size
            self.const(name, value)
            return
        parts = []
        for i, (offset, shape) in enumerate(pieces):
            size = shape[0] * shape[1]
            part = name if len(pieces) == 1 else f"{name}/part{i}"
            self.const(f"{part}/start", np.array([offset], np.int64))
            self.const(f"{part}/end", np.array([offset + size], np.int64))
            self.const(f"{part}/shape", np.array(shape, np.int64))
            self.nodes.append(helper.make_node("Slice", ["data", f"{part}/start", f"{part}/end"], [f"{part}/flat"]))
            self.nodes.append(helper.make_node("Reshape", [f"{part}/flat", f"{part}/shape"], [part]))
            parts.append(part)
        if len(parts) > 1:
            self.nodes.append(helper.make_node("Concat", parts, [name], axis=0))


def function_body(hm, prefix: str, dtype, overload: str) -> onnx.FunctionProto:
    """The model-local function ``ai.dehm.HMatMul`` (this overload) computing ``X @ W_H``."""
    nodes, inits, _ = emit_subgraph(hm, "X", "Y", prefix, dtype)
    body = _BodyBuilder(_FactorIndex(hm, dtype))
    for init in inits:
        value = numpy_helper.to_array(init)
        if np.issubdtype(value.dtype, np.floating):
            body.factor(init.name, value)
        else:
            body.const(init.name, value)
    if body.copied:
        logger.info("function body of %r repeats %d weight values not found in the packed data", prefix, body.copied)
    return helper.make_function(
        hmatmul.DOMAIN,
        hmatmul.OP_TYPE,
        list(hmatmul.INPUTS),
        list(hmatmul.OUTPUTS),
        body.nodes + list(nodes),
        opset_imports=[helper.make_opsetid("", FUNCTION_OPSET)],
        overload=overload,
    )


def fit_function_to_model(model: onnx.ModelProto, function: onnx.FunctionProto) -> None:
    """Make a function body from this module valid in ``model`` (called when splicing).

    The ONNX checker requires a function's opset imports to equal the model's for the same
    domain, and overloads need IR version 10, so both are raised to match the model.
    """
    versions = {o.domain: o.version for o in model.opset_import}
    for op in function.opset_import:
        if op.domain in versions:
            op.version = versions[op.domain]
    if model.ir_version < FUNCTION_IR_VERSION:
        model.ir_version = FUNCTION_IR_VERSION


def emit_function(hm, x_name: str, y_name: str, prefix: str, dtype):
    """Emit ``y = x @ W_H`` as one ``HMatMul`` node plus its model-local function body.

    For activation dtypes the op does not support (anything but float32/float16) this
    falls back to the ``subgraph`` emission.
    """
    dtype = np.dtype(dtype)
    if dtype not in SUPPORTED_DTYPES:
        logger.info("HMatMul does not support %s; %r uses the subgraph emission", dtype, prefix)
        return emit_subgraph(hm, x_name, y_name, prefix, dtype)
    inits, names = packed_inputs(hm, prefix, dtype)
    node = hmatmul_node(x_name, y_name, prefix, names, overload=prefix)
    return [node], inits, [function_body(hm, prefix, dtype, prefix)]
