"""Standard-op emission (``--emit ops``): ``y = x @ W_H`` as Slice, MatMul, Concat, Add and Gather nodes.

With the permuted weight ``Wp = W[row_perm][:, col_perm]`` tiled by blocks ``B`` over
``[r0, r1) x [c0, c1)``::

    xp = Gather(x, row_perm, axis=-1)                    (only with a row permutation)
    yp[..., c0:c1] = sum over blocks B of xp[..., r0:r1] @ B
    y  = Gather(yp, inverse(col_perm), axis=-1)          (only with a column permutation)

A low-rank block ``U @ Vt`` is applied as ``(x_b @ U) @ Vt``, never as ``x_b @ (U @ Vt)``:
onnxruntime folds constant subexpressions, and ``U @ Vt`` would rebuild the dense block.

Node count matters more than parameter count in this mode (each node costs a few µs in
onnxruntime), so the emission is arranged to use few nodes:

- zero blocks emit nothing;
- a slice of x is made once per distinct row range (none for the full range);
- all blocks over the same column range share one MatMul: their left factors ``x_b @ U``
  (low-rank) or ``x_b`` (dense) are concatenated and multiplied by the stacked right
  factors ``[Vt; D; ...]``, since ``sum_i L_i R_i = [L_1 .. L_k] @ [R_1; ..; R_k]``;
- dense blocks with adjacent row ranges in one column range share one slice;
- narrower column ranges are assembled recursively and joined by one Concat.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ..hmatrix import Block, BlockKind

__all__ = ["Emission", "emit_ops", "initializer"]


@dataclass
class Emission:
    """What an emitter returns: new nodes (in order), the initializers they read, any
    model-local functions they call, and the value holding ``x @ W_H``."""

    nodes: list
    initializers: list
    output: ir.Value
    functions: list = field(default_factory=list)


def initializer(name: str, array: np.ndarray) -> ir.Value:
    """A new initializer value (no declared type, so no ``value_info`` is written for it)."""
    return ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))


class _Builder:
    """Collects nodes and initializers whose names all start with ``prefix``."""

    def __init__(self, prefix: str, dtype: np.dtype):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []
        self._count = 0
        self._int_consts: dict[tuple, ir.Value] = {}

    def _fresh(self, stem: str) -> str:
        self._count += 1
        return f"{self.prefix}/{stem}{self._count}"

    def weight(self, stem: str, array: np.ndarray) -> ir.Value:
        value = initializer(self._fresh(stem), np.asarray(array, dtype=self.dtype))
        self.initializers.append(value)
        return value

    def ints(self, values: list[int] | np.ndarray) -> ir.Value:
        key = tuple(int(v) for v in values)
        if key not in self._int_consts:
            value = initializer(self._fresh("i"), np.asarray(key, dtype=np.int64))
            self.initializers.append(value)
            self._int_consts[key] = value
        return self._int_consts[key]

    def node(self, op: str, inputs: list[ir.Value], stem: str, **attrs) -> ir.Value:
        out = self._fresh(stem)
        node = ir.node(op, inputs, attrs, name=out, outputs=[ir.Value(name=out)])
        self.nodes.append(node)
        return node.outputs[0]


class _OpsEmitter:
    def __init__(self, hm, x: ir.Value, builder: _Builder):
        self.hm = hm
        self.b = builder
        self.x = x
        self._slices: dict[tuple[int, int], ir.Value] = {}
        self._left: dict[int, ir.Value] = {}

    def run(self) -> ir.Value:
        m, n = self.hm.shape
        if self.hm.row_perm is not None:
            self.x = self.b.node("Gather", [self.x, self.b.ints(self.hm.row_perm)], "row_perm", axis=-1)
        blocks = [blk for blk in self.hm.blocks if _is_nonzero(blk)]
        y = self.assemble(0, n, blocks)
        if self.hm.col_perm is not None:
            inverse = np.empty(n, dtype=np.int64)
            inverse[self.hm.col_perm] = np.arange(n)
            y = self.b.node("Gather", [y, self.b.ints(inverse)], "col_perm", axis=-1)
        return y

    def rows(self, r0: int, r1: int) -> ir.Value:
        """``x[..., r0:r1]``, sliced once per range."""
        if (r0, r1) == (0, self.hm.shape[0]):
            return self.x
        if (r0, r1) not in self._slices:
            b = self.b
            self._slices[(r0, r1)] = b.node("Slice", [self.x, b.ints([r0]), b.ints([r1]), b.ints([-1])], "x_rows")
        return self._slices[(r0, r1)]

    def zeros(self, width: int) -> ir.Value:
        """A tensor of zeros shaped ``(..., width)`` (x's leading dimensions)."""
        return self.b.node("MatMul", [self.rows(0, 1), self.b.weight("zero", np.zeros((1, width)))], "zeros")

    def left_factor(self, blk: Block) -> ir.Value:
        """``x_b @ U`` of a low-rank block, computed once even when its columns are split."""
        key = id(blk.u)
        if key not in self._left:
            self._left[key] = self.b.node("MatMul", [self.rows(blk.r0, blk.r1), self.b.weight("u", blk.u)], "xu")
        return self._left[key]

    def assemble(self, c0: int, c1: int, blocks: list[Block]) -> ir.Value:
        """``yp[..., c0:c1]`` from the nonzero blocks lying inside ``[c0, c1)``."""
        full = [blk for blk in blocks if (blk.c0, blk.c1) == (c0, c1)]
        rest = [blk for blk in blocks if (blk.c0, blk.c1) != (c0, c1)]
        terms = []
        if full:
            terms.append(self.column_product(full))
        if rest:
            parts = [self.assemble(a, z, inside) if inside else self.zeros(z - a) for a, z, inside in _partition(c0, c1, rest)]
            terms.append(parts[0] if len(parts) == 1 else self.b.node("Concat", parts, "concat", axis=-1))
        if not terms:
            return self.zeros(c1 - c0)
        if len(terms) == 1:
            return terms[0]
        return self.b.node("Add", terms, "add")

    def column_product(self, blocks: list[Block]) -> ir.Value:
        """``sum_b x_b @ B`` for blocks sharing one column range, as one MatMul."""
        lefts, rights = [], []
        for blk in blocks:
            if blk.kind == BlockKind.LOWRANK:
                lefts.append(self.left_factor(blk))
                rights.append(blk.vt)
        for r0, r1, stacked in _merge_dense_rows([blk for blk in blocks if blk.kind == BlockKind.DENSE]):
            lefts.append(self.rows(r0, r1))
            rights.append(stacked)
        left = lefts[0] if len(lefts) == 1 else self.b.node("Concat", lefts, "concat", axis=-1)
        stem = "vt" if all(blk.kind == BlockKind.LOWRANK for blk in blocks) else "w"
        return self.b.node("MatMul", [left, self.b.weight(stem, np.concatenate(rights, axis=0))], "y")


def _is_nonzero(blk: Block) -> bool:
    return blk.kind == BlockKind.DENSE or (blk.kind == BlockKind.LOWRANK and blk.rank > 0)


def _merge_dense_rows(blocks: list[Block]) -> list[tuple[int, int, np.ndarray]]:
    """Dense blocks of one column range, with adjacent row ranges stacked into one."""
    runs: list[list] = []
    for blk in sorted(blocks, key=lambda b: b.r0):
        if runs and runs[-1][1] == blk.r0:
            runs[-1][1] = blk.r1
            runs[-1][2].append(blk.dense)
        else:
            runs.append([blk.r0, blk.r1, [blk.dense]])
    return [(r0, r1, np.concatenate(parts, axis=0)) for r0, r1, parts in runs]


def _split_columns(blk: Block, cuts: list[int]) -> list[Block]:
    """``blk`` cut at the column positions ``cuts`` (low-rank pieces share the same ``u``)."""
    edges = [blk.c0] + [c for c in cuts if blk.c0 < c < blk.c1] + [blk.c1]
    pieces = []
    for a, z in zip(edges[:-1], edges[1:]):
        lo, hi = a - blk.c0, z - blk.c0
        if blk.kind == BlockKind.DENSE:
            pieces.append(Block(BlockKind.DENSE, blk.r0, blk.r1, a, z, dense=blk.dense[:, lo:hi]))
        else:
            pieces.append(Block(BlockKind.LOWRANK, blk.r0, blk.r1, a, z, u=blk.u, vt=blk.vt[:, lo:hi]))
    return pieces


def _partition(c0: int, c1: int, blocks: list[Block]) -> list[tuple[int, int, list[Block]]]:
    """Split ``[c0, c1)`` into consecutive parts that no block crosses, each with its blocks.

    Parts are the unions of overlapping column ranges, plus the uncovered gaps (no blocks).
    When one union is all of ``[c0, c1)`` (ranges that overlap without nesting), the blocks
    are first cut at every column boundary, which always yields at least two parts.
    """
    spans: list[list[int]] = []
    for a, z in sorted((blk.c0, blk.c1) for blk in blocks):
        if spans and a < spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], z)
        else:
            spans.append([a, z])
    if spans == [[c0, c1]]:
        cuts = sorted({c for blk in blocks for c in (blk.c0, blk.c1)})
        return _partition(c0, c1, [piece for blk in blocks for piece in _split_columns(blk, cuts)])
    parts, position = [], c0
    for a, z in spans:
        if a > position:
            parts.append((position, a, []))
        parts.append((a, z, [blk for blk in blocks if a <= blk.c0 and blk.c1 <= z]))
        position = z
    if position < c1:
        parts.append((position, c1, []))
    return parts


def emit_ops(hm, x: ir.Value, prefix: str, dtype) -> Emission:
    """Emit ``x @ W_H`` with standard ONNX ops (opset >= 11); see the module docstring.

    Returns:
        An ``Emission`` with no functions; its ``output`` is the last node's output.
    """
    builder = _Builder(prefix, dtype)
    y = _OpsEmitter(hm, x, builder).run()
    assert builder.nodes and builder.nodes[-1].outputs[0] is y, "Bug: the result is not the last node's output"
    return Emission(builder.nodes, builder.initializers, y)
