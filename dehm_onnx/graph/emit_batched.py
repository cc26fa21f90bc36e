"""Nodes of a batched plan (``emit_plan.Plan``): ``y = x @ W_H`` in the K-major layout.

See ``emit_plan`` for the algebra. The node sequence, for ``x`` of shape ``(..., m)``::

    x2   = Reshape(x, [-1, m])                 (only when x is not known to be 2-D)
    xt   = Transpose(x2)                        (m, N)
    xt   = Gather(xt, row_perm, axis=0)         (a row permutation)
    tile = Reshape(xt, [m // S, S, -1])         one per tile size (then Gather whole tiles), or
           Reshape(Gather(xt, rows), [R, S, -1])
    T    = MatMul(Ustack, tile)                 one per left group, flattened by a Reshape
    part = Reshape(MatMul(Vstack, Reshape(Gather(Concat(xt, T..), idx), [C, J, -1])), [C*c, -1])
           (dense groups gather whole tiles instead; Pad + Gather place rows that are not a grid)
    yt   = Sum(part, ...)                       (n, N)
    y    = Transpose(Gather(yt, col_inverse))   (N, n), then reshaped to x's leading dims

The stacks are written in their stored form (float, float16, int8, int4 with scales) followed by
``Cast``/``Mul``/``Reshape``/``Slice``/``Concat`` nodes that read only constants, which
onnxruntime folds into one float tensor per stack when the session is created.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..hmatrix import Storage
from .emit_ops import dequantize_nodes
from .emit_plan import Part, Plan, RightGroup, Stack, Tensor, Tiles

__all__ = ["emit_plan_nodes", "PlanEmitter", "INT4_OPSET"]

# int4 tensors (and Cast from them) need the default-domain opset 21.
INT4_OPSET = 21


def _onnx_dtype(dtype) -> ir.DataType:
    return ir.DataType.from_numpy(np.dtype(dtype))


class PlanEmitter:
    """Appends a plan's nodes to a builder (``emit_ops._Builder`` interface); ``stack`` is
    the one step a function body overrides (``emit_body``)."""

    def __init__(self, plan: Plan, builder, x: ir.Value, x_rank: int | None, opset: int):
        self.plan = plan
        self.opset = opset
        self.b = builder
        self.x = x
        self.x_rank = x_rank
        self.dtype = np.dtype(plan.dtype)
        self._tensors: dict[int, ir.Value] = {}
        self._grids: dict[int, ir.Value] = {}
        self._tiles: dict[str, ir.Value] = {}

    # -------------------------------------------------------------- constants
    def tensor(self, t: Tensor) -> ir.Value:
        """The initializer of a plan tensor (created once)."""
        if id(t) not in self._tensors:
            # Below opset 21 int4 values are written as int8 (the same integers, twice the bytes).
            int4 = t.storage == Storage.INT4 and self.opset >= INT4_OPSET
            if t.role == "index":
                self._tensors[id(t)] = self.b.index(t.name, t.values)
            else:
                self._tensors[id(t)] = self.b.stored(t.name, t.values, int4=int4)
        return self._tensors[id(t)]

    def part(self, p: Part, stem: str) -> ir.Value:
        b = self.b
        payload = self.tensor(p.payload)
        if p.storage == Storage.FLOAT:
            return payload
        if p.storage == Storage.FP16:
            return b.node("Cast", [payload], f"{stem}_cast", to=_onnx_dtype(self.dtype))
        scale_dtype = p.scales.values.dtype
        deq = dequantize_nodes(b, payload, self.tensor(p.scales), scale_dtype, stem)
        deq = b.node("Reshape", [deq, b.ints(p.deq_shape)], f"{stem}_shape")
        if p.length:
            deq = b.node("Slice", [deq, b.ints([0]), b.ints([p.length]), b.ints([-1])], f"{stem}_cut")
        if scale_dtype != self.dtype:
            deq = b.node("Cast", [deq], f"{stem}_to", to=_onnx_dtype(self.dtype))
        return deq

    def stack(self, s: Stack, stem: str) -> ir.Value:
        parts = [self.part(p, f"{stem}{i}") for i, p in enumerate(s.parts)]
        value = parts[0] if len(parts) == 1 else self.b.node("Concat", parts, f"{stem}_stack", axis=s.axis)
        if s.reshape:
            value = self.b.node("Reshape", [value, self.b.ints(s.shape)], f"{stem}_reshape")
        return value

    # -------------------------------------------------------------- activations
    def tiles(self, xt: ir.Value, t: Tiles) -> ir.Value:
        """``(R, S, N)`` row tiles of ``xt``."""
        if t.key in self._tiles:
            return self._tiles[t.key]
        b = self.b
        m = self.plan.shape[0]
        if t.grid:
            if t.S not in self._grids:
                self._grids[t.S] = b.node("Reshape", [xt, b.ints([m // t.S, t.S, -1])], "x_tiles")
            value = self._grids[t.S]
            if t.slabs is not None:
                value = b.node("Gather", [value, self.tensor(t.slabs)], "x_slabs", axis=0)
        else:
            rows = b.node("Gather", [xt, self.tensor(t.rows)], "x_rows", axis=0)
            value = b.node("Reshape", [rows, b.ints([t.R, t.S, -1])], "x_tiles")
        self._tiles[t.key] = value
        return value

    def right(self, xt: ir.Value, flat: dict, rg: RightGroup) -> ir.Value:
        b = self.b
        if rg.tiles is not None:
            src = self.tiles(xt, rg.tiles)
            if rg.slabs is not None:
                src = b.node("Gather", [src, self.tensor(rg.slabs)], "slabs", axis=0)
                src = b.node("Reshape", [src, b.ints([rg.C, rg.J, -1])], "slab_rows")
        else:
            inputs = [xt if s == "x" else flat[s] for s in rg.sources]
            src = inputs[0] if len(inputs) == 1 else b.node("Concat", inputs, "sources", axis=0)
            src = b.node("Gather", [src, self.tensor(rg.gather)], "gather", axis=0)
            src = b.node("Reshape", [src, b.ints([rg.C, rg.J, -1])], "gathered")
        y = b.node("MatMul", [self.stack(rg.stack, f"{rg.key}.v"), src], "yt")
        y = b.node("Reshape", [y, b.ints([rg.C * rg.c, -1])], "yt_rows")
        if rg.placement is not None:
            y = b.node("Pad", [y, b.ints([0, 0, 1, 0])], "yt_pad")
            y = b.node("Gather", [y, self.tensor(rg.placement)], "yt_place", axis=0)
        return y

    def run(self) -> ir.Value:
        b, plan = self.b, self.plan
        m, n = plan.shape
        x2 = self.x if self.x_rank == 2 else b.node("Reshape", [self.x, b.ints([-1, m])], "x2d")
        xt = b.node("Transpose", [x2], "xt", perm=[1, 0])
        if plan.row_perm is not None:
            xt = b.node("Gather", [xt, self.tensor(plan.row_perm)], "row_perm", axis=0)
        flat = {}
        for lg in plan.lefts:
            t = b.node("MatMul", [self.stack(lg.stack, f"{lg.key}.u"), self.tiles(xt, lg.tiles)], "t")
            R, K, _ = lg.stack.shape
            flat[lg.key] = b.node("Reshape", [t, b.ints([R * K, -1])], "t_rows")
        parts = [self.right(xt, flat, rg) for rg in plan.rights]
        yt = parts[0] if len(parts) == 1 else b.node("Sum", parts, "yt_sum")
        if plan.col_inverse is not None:
            yt = b.node("Gather", [yt, self.tensor(plan.col_inverse)], "col_perm", axis=0)
        y = b.node("Transpose", [yt], "y2d", perm=[1, 0])
        if self.x_rank == 2:
            return y
        if self.opset >= 15:
            lead = b.node("Shape", [self.x], "x_lead", start=0, end=-1)
        else:
            lead = b.node("Slice", [b.node("Shape", [self.x], "x_shape"), b.ints([0]), b.ints([-1])], "x_lead")
        shape = b.node("Concat", [lead, b.ints([n])], "y_shape", axis=0)
        # allowzero: a 0 in the shape is an empty dimension, not "copy the input's" (opset 14).
        return b.node("Reshape", [y, shape], "y", **({"allowzero": 1} if self.opset >= 14 else {}))


def emit_plan_nodes(plan: Plan, builder, x: ir.Value, x_rank: int | None = None, opset: int = 21) -> ir.Value:
    """Append the nodes of ``plan`` to ``builder`` (an ``emit_ops._Builder``); returns ``y``.

    ``x_rank`` is the rank of ``x`` when known (2 skips the flattening and restoring nodes).
    ``opset`` is the model's default-domain opset: below 14, restoring leading dimensions of
    size 0 fails at run time (``Reshape`` has no ``allowzero``), so callers use the standard
    per-block emission there when ``x`` is not 2-D.
    """
    return PlanEmitter(plan, builder, x, x_rank, opset).run()
