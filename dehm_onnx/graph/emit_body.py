"""Function bodies in the batched family: a plan of ``emit_plan`` whose stacks are assembled
from the layer's packed arrays.

A ``function`` layer stores its weights once, as the packed inputs of its ``HMatMul`` node;
its body rebuilds every constant it multiplies by from them. The ``blocks`` body multiplies by
each stored array separately (one product per block tier). The batched body runs the nodes of
a batched plan (``emit_batched``) and builds each factor stack out of the arrays the body
decodes (``array_value``), with a number of nodes that grows with the number of distinct
array shapes, not with the number of blocks:

- left stack ``(B, O, L)``, slot ``[b, o, :]`` a column of some ``U``: the ``U`` of one row
  count are concatenated side by side, transposed (their columns become rows) and padded to
  ``L``;
- right stack ``(C, c, J)``, slot ``[j, :, p]`` a row of a ``Vt``/``D`` chunk: arrays used
  whole are concatenated by width and padded to ``c``; arrays cut into ``c``-wide chunks are
  concatenated by width, padded to whole chunks and reshaped so that each chunk row is a row;
- a ``Gather`` of that table of rows (plus one zero row for empty slots) puts every vector in
  its slot, then a ``Reshape`` (and for right stacks a ``Transpose``) gives the stack.

Everything before the plan's first ``MatMul`` depends only on initializers, so onnxruntime
folds it into the same constant stacks the ``ops`` emission stores (checked in the tests on
the optimized graph).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import numpy as np
import onnx_ir as ir

from ..hmatrix import StoredArray
from .emit_batched import PlanEmitter
from .emit_plan import Plan, Stack

__all__ = ["emit_batched_body", "BODY_BATCHED_OPSET"]

# The body does not know the activation's rank; restoring its leading dimensions needs
# ``Reshape(allowzero)`` (opset 14).
BODY_BATCHED_OPSET = 14

ArrayValue = Callable[[StoredArray], ir.Value]


class _BodyOps:
    """The ``emit_ops._Builder`` interface for a function body: nodes are appended to
    ``nodes``, shape and index constants are ``Constant`` nodes (``value_ints``), and stored
    tensors do not exist (the arrays come from the packed data)."""

    def __init__(self, nodes: list[ir.Node]):
        self.nodes = nodes
        self._ints: dict[tuple[int, ...], ir.Value] = {}
        self._count = 0

    def _value(self) -> ir.Value:
        self._count += 1
        return ir.Value(name=f"b{self._count}")

    def ints(self, values) -> ir.Value:
        """An int64 constant, made once per value."""
        key = tuple(int(v) for v in np.asarray(values).ravel())
        if key not in self._ints:
            out = self._value()
            self.nodes.append(ir.node("Constant", [], {"value_ints": list(key)}, outputs=[out], name=""))
            self._ints[key] = out
        return self._ints[key]

    def index(self, stem: str, values: np.ndarray) -> ir.Value:
        """Gather indices (int64, written as varints)."""
        return self.ints(values)

    def stored(self, stem: str, values: np.ndarray, int4: bool = False) -> ir.Value:
        """Never called: the plan's stacks are assembled by ``_StackAssembler``."""
        raise AssertionError("Bug: a function body stores no tensor; its stacks come from the packed data")

    def node(self, op: str, inputs: list[ir.Value], stem: str = "", **attrs) -> ir.Value:
        out = self._value()
        self.nodes.append(ir.node(op, inputs, attrs, outputs=[out], name=""))
        return out


class _StackAssembler:
    """Builds a plan's stacks from decoded arrays (see the module docstring)."""

    def __init__(self, ops: _BodyOps, array_value: ArrayValue):
        self.ops = ops
        self.array_value = array_value

    def stack(self, s: Stack) -> ir.Value:
        """The value of stack ``s``."""
        left = s.axis == 1
        P, Q, length = (s.shape[0], s.shape[1], s.shape[2]) if left else (s.shape[0], s.shape[2], s.shape[1])
        table, rows, count = self._table(s.vectors, length, left)
        index = np.full(P * Q, count, dtype=np.int64)
        for (p, q), (arr, k, start, stop) in s.vectors.items():
            index[p * Q + q] = rows[(id(arr), start, stop)] + k
        ops = self.ops
        if not np.array_equal(index, np.arange(count)):
            if (index == count).any():
                table = ops.node("Pad", [table, ops.ints([0, 0, 1, 0])])
            table = ops.node("Gather", [table, ops.index("", index)], axis=0)
        value = ops.node("Reshape", [table, ops.ints([P, Q, length])])
        return value if left else ops.node("Transpose", [value], perm=[0, 2, 1])

    def _table(self, vectors: dict, length: int, left: bool):
        """``(table, first row of each (array, start, stop), rows)``: a ``(rows, length)``
        value holding every vector of ``vectors`` as a row."""
        pieces: dict[tuple, tuple[StoredArray, int, int]] = {}
        for arr, _, start, stop in vectors.values():
            pieces.setdefault((id(arr), start, stop), (arr, start, stop))
        groups = _left_groups(pieces) if left else _right_groups(pieces, length)
        parts, rows, count = [], {}, 0
        for kind, width, members in groups:
            build = {"columns": self._columns, "rows": self._rows, "chunks": self._chunks}[kind]
            value, layout, height = build(width, members, length)
            parts.append(value)
            for key, offset in layout.items():
                rows[key] = count + offset
            count += height
        table = parts[0] if len(parts) == 1 else self.ops.node("Concat", parts, axis=0)
        return table, rows, count

    def _columns(self, width: int, members: list, length: int):
        """``U`` arrays of ``width`` rows, side by side and transposed: each column a row."""
        values = [self.array_value(arr) for arr, _, _ in members]
        joined = values[0] if len(values) == 1 else self.ops.node("Concat", values, axis=1)
        rows = self.ops.node("Transpose", [joined], perm=[1, 0])
        layout, offset = {}, 0
        for arr, start, stop in members:
            layout[(id(arr), start, stop)] = offset
            offset += arr.shape[1]
        return _pad_columns(self.ops, rows, width, length), layout, offset

    def _rows(self, width: int, members: list, length: int):
        """Whole arrays, or column slices, ``width`` wide, one under the other."""
        ops, parts = self.ops, []
        for arr, start, stop in members:
            value = self.array_value(arr)
            if (start, stop) != (0, arr.shape[1]):
                value = ops.node("Slice", [value, ops.ints([start]), ops.ints([stop]), ops.ints([1])])
            parts.append(value)
        joined = parts[0] if len(parts) == 1 else ops.node("Concat", parts, axis=0)
        layout, offset = {}, 0
        for arr, start, stop in members:
            layout[(id(arr), start, stop)] = offset
            offset += arr.shape[0]
        return _pad_columns(ops, joined, width, length), layout, offset

    def _chunks(self, width: int, members: list, length: int):
        """Arrays ``width`` wide cut into ``length``-wide chunks: stacked, padded to whole
        chunks and reshaped so that row ``k`` of chunk ``q`` of an array is one row."""
        ops = self.ops
        distinct = list({id(arr): arr for arr, _, _ in members}.values())
        values = [self.array_value(arr) for arr in distinct]
        joined = values[0] if len(values) == 1 else ops.node("Concat", values, axis=0)
        chunks = -(-width // length)
        joined = _pad_columns(ops, joined, width, chunks * length)
        height = sum(arr.shape[0] for arr in distinct)
        cube = ops.node("Reshape", [joined, ops.ints([height, chunks, length])])
        cube = ops.node("Transpose", [cube], perm=[1, 0, 2])
        flat = ops.node("Reshape", [cube, ops.ints([chunks * height, length])])
        first, offset = {}, 0
        for arr in distinct:
            first[id(arr)] = offset
            offset += arr.shape[0]
        layout = {(id(arr), start, stop): (start // length) * height + first[id(arr)] for arr, start, stop in members}
        return flat, layout, chunks * height


def _pad_columns(ops: _BodyOps, value: ir.Value, width: int, length: int) -> ir.Value:
    """``value`` (``rows x width``) zero-padded on the right to ``length`` columns."""
    if width == length:
        return value
    return ops.node("Pad", [value, ops.ints([0, 0, 0, length - width])])


def _left_groups(pieces: dict) -> list:
    """Left-stack pieces (whole columns of ``U``) grouped by row count."""
    by_rows = defaultdict(list)
    for arr, start, stop in pieces.values():
        by_rows[arr.shape[0]].append((arr, start, stop))
    return [("columns", rows, members) for rows, members in sorted(by_rows.items())]


def _right_groups(pieces: dict, length: int) -> list:
    """Right-stack pieces grouped as whole rows by width, or as aligned chunks by array width."""
    per_array = defaultdict(list)
    for arr, start, stop in pieces.values():
        per_array[id(arr)].append((arr, start, stop))
    rows, chunks = defaultdict(list), defaultdict(list)
    for members in per_array.values():
        arr = members[0][0]
        cols = arr.shape[1]
        aligned = all(start % length == 0 and stop == min(start + length, cols) for _, start, stop in members)
        if cols > length and aligned:
            chunks[cols] += members
        else:
            for piece in members:
                rows[piece[2] - piece[1]].append(piece)
    return ([("rows", w, m) for w, m in sorted(rows.items())]
            + [("chunks", w, m) for w, m in sorted(chunks.items())])


class _BodyPlanEmitter(PlanEmitter):
    """The plan's nodes, with each stack assembled from the decoded arrays."""

    def __init__(self, plan: Plan, ops: _BodyOps, x: ir.Value, opset: int, assembler: _StackAssembler):
        super().__init__(plan, ops, x, None, opset)
        self.assembler = assembler

    def stack(self, s: Stack, stem: str) -> ir.Value:
        return self.assembler.stack(s)


def emit_batched_body(plan: Plan, x: ir.Value, nodes: list[ir.Node], array_value: ArrayValue, opset: int) -> ir.Value:
    """Append to ``nodes`` the batched body of ``plan`` (built from an H-matrix whose arrays
    are all float) reading ``x`` of any rank; ``array_value(arr)`` gives the body's value of
    each of the plan's arrays, in ``x``'s dtype. Returns ``y``."""
    if opset < BODY_BATCHED_OPSET:
        raise ValueError(f"a batched function body needs opset {BODY_BATCHED_OPSET}, got {opset}")
    ops = _BodyOps(nodes)
    return _BodyPlanEmitter(plan, ops, x, opset, _StackAssembler(ops, array_value)).run()
