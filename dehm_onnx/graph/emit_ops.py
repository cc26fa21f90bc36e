"""Standard-op emission (``--emit ops``): ``y = x @ W_H`` with ONNX operators only.

Two families of nodes compute the same product; ``emit_ops`` takes the one the cost model
(``dehm_onnx.graph.cost``) prefers for this weight, or the one the ``EmitContext`` forces:

- ``batched`` (``emit_plan`` and ``emit_batched``): stacked factors, a few batched MatMuls per
  block size; the node count grows with the depth of the block tree, not with the blocks.
- ``blocks``: one product per block (or per tier), assembled per column range, as follows.

With the permuted weight ``Wp = W[row_perm][:, col_perm]`` tiled by blocks ``B`` over
``[r0, r1) x [c0, c1)``::

    xp = Gather(x, row_perm, axis=-1)                    (only with a row permutation)
    yp[..., c0:c1] = sum over blocks B of xp[..., r0:r1] @ B
    y  = Gather(yp, inverse(col_perm), axis=-1)          (only with a column permutation)

A low-rank block ``U @ Vt`` (one term per tier of storage) is applied as ``(x_b @ U) @ Vt``,
never as ``x_b @ (U @ Vt)``: onnxruntime folds constant subexpressions, and ``U @ Vt`` would
rebuild the dense block. Zero blocks emit nothing; a slice of x is made once per distinct row
range; the terms over one column range share one MatMul (``sum_i L_i R_i = [L_1 .. L_k] @
[R_1; ..; R_k]``), except integer arrays written for onnxruntime's quantized kernel (below);
narrower column ranges are assembled recursively and joined by one Concat.

Storage of a constant array ``A`` (``K x N``, rows along the contraction axis):

- ``float``: an initializer in the activation dtype;
- ``fp16``: a float16 initializer and a ``Cast`` (folded into a float constant at load time:
  the file holds 2 bytes a value, memory the activation dtype);
- ``int8``/``int4``, *fused*: ``DequantizeLinear(q, scales, axis=0, block_size=g)`` feeding the
  MatMul alone, the form onnxruntime rewrites into its ``MatMulNBits`` kernel (opset 21;
  at an older opset, int8 arrays of one group use per-column scales, ``axis=1``); by default
  that kernel quantizes the activations to 8 bits (about 5e-3 relative output error), so the
  pass allows it only where the layer's output bound does (``EmitContext.fuse_int``);
- ``int8``/``int4``, *folded*: ``Reshape(Cast(q) * scales)`` over groups of rows, exactly the
  dequantized values, folded into a float constant at load time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ..hmatrix import BlockKind, Storage, StoredArray
from ..hmatrix.storage import group_count
from .emit_plan import INDEX_DTYPE, Term, narrow_index_dtype, terms_of

__all__ = [
    "Emission",
    "EmitContext",
    "emit_ops",
    "emit_blocks",
    "emit_batched",
    "initializer",
    "FUSED_INT_OPSET",
    "stored_array_nodes",
    "dequantize_nodes",
]

# Blocked DequantizeLinear (and int4) need the default-domain opset 21.
FUSED_INT_OPSET = 21


@dataclass
class Emission:
    """What an emitter returns: new nodes (in order), the initializers they read, any
    model-local functions they call, and the value holding ``x @ W_H``.

    ``family`` says which family of nodes was written (``batched``, ``blocks`` or ``kernel``);
    ``inputs`` lists the initializers that hold weights (the rest are small shape constants).
    """

    nodes: list
    initializers: list
    output: ir.Value
    functions: list = field(default_factory=list)
    family: str = "blocks"
    inputs: list = field(default_factory=list)


@dataclass(frozen=True)
class EmitContext:
    """What an emitter needs to know about the model and the choices already made.

    Attributes:
        x_rank: rank of the activation when known.
        opset: the model's default-domain opset.
        fuse_int: write integer arrays in the form onnxruntime fuses into ``MatMulNBits``
            (int8 activations at its default accuracy level); else dequantize them at load time.
        family: ``auto`` (the cost model decides), ``batched`` or ``blocks``.
        options: ``emit_plan.PlanOptions`` for the batched family (``None``: cost model).
    """

    x_rank: int | None = None
    opset: int = FUSED_INT_OPSET
    fuse_int: bool = False
    family: str = "auto"
    options: object = None


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
        self.inputs: list[ir.Value] = []
        self.cost = None  # a cost.Cost when the emitter records what its nodes execute
        self._count = 0
        self._int_consts: dict[tuple, ir.Value] = {}

    def _fresh(self, stem: str) -> str:
        self._count += 1
        return f"{self.prefix}/{stem}{self._count}"

    def weight(self, stem: str, array: np.ndarray) -> ir.Value:
        """A weight initializer in the activation dtype."""
        return self.stored(stem, np.asarray(array, dtype=self.dtype))

    def stored(self, stem: str, values: np.ndarray, int4: bool = False) -> ir.Value:
        """A weight initializer holding ``values`` as given (as ONNX INT4 when ``int4``)."""
        array = np.ascontiguousarray(values)
        if int4:
            import ml_dtypes

            array = array.astype(ml_dtypes.int4)
        name = self._fresh(stem)
        value = initializer(name, array)
        self.initializers.append(value)
        self.inputs.append(value)
        return value

    def index(self, stem: str, values: np.ndarray) -> ir.Value:
        """Gather indices as int32, stored in the narrowest unsigned type that holds them and
        widened by a ``Cast`` that onnxruntime folds when the session is created (on small
        layers the indices are a large part of the file)."""
        values = np.asarray(values)
        narrow = narrow_index_dtype(values)
        if narrow == INDEX_DTYPE:
            return self.stored(stem, values.astype(INDEX_DTYPE))
        stored = self.stored(f"{stem}_n", values.astype(narrow))
        return self.node("Cast", [stored], stem, to=ir.DataType.INT32)

    def ints(self, values: list[int] | np.ndarray) -> ir.Value:
        """A small int64 constant (shapes, axes), made once per value."""
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


def stored_array_nodes(b: _Builder, arr: StoredArray, stem: str, *, fuse: bool, opset: int) -> ir.Value:
    """``arr`` (``K x N``) as a value in the activation dtype (see the module docstring)."""
    dtype = b.dtype
    if arr.storage == Storage.FLOAT or (arr.storage == Storage.FP16 and dtype == np.float16):
        return b.stored(stem, arr.values.astype(dtype, copy=False))
    if arr.storage == Storage.FP16:
        return b.node("Cast", [b.stored(f"{stem}_f16", arr.values)], f"{stem}_cast", to=ir.DataType.from_numpy(dtype))
    int4 = arr.storage == Storage.INT4 and opset >= FUSED_INT_OPSET  # else widened to int8 (exact)
    scale_dtype = arr.scales.dtype
    K, N = arr.shape
    if fuse and scale_dtype == dtype and dtype in (np.float32, np.float16):
        if opset >= FUSED_INT_OPSET:
            q = b.stored(f"{stem}_q", arr.values, int4=int4)
            s = b.stored(f"{stem}_scales", arr.scales)
            return b.node("DequantizeLinear", [q, s], f"{stem}_dq", axis=0, block_size=arr.group)
        # Per-column scales (one group): opset 13 for float32 scales, 19 for float16 ones.
        if arr.storage == Storage.INT8 and arr.scales.shape[0] == 1 and opset >= (19 if scale_dtype == np.float16 else 13):
            q = b.stored(f"{stem}_q", arr.values)
            s = b.stored(f"{stem}_scales", arr.scales[0])
            return b.node("DequantizeLinear", [q, s], f"{stem}_dq", axis=1)
    g = min(arr.group, K)
    G = group_count(K, g)
    q = np.zeros((G * g, N), dtype=np.int8)
    q[:K] = arr.values
    own = np.minimum((np.arange(G) * g) // arr.group, arr.scales.shape[0] - 1)
    qv = b.stored(f"{stem}_q", q.reshape(G, g, N), int4=int4)
    sv = b.stored(f"{stem}_scales", arr.scales[own].reshape(G, 1, N))
    value = dequantize_nodes(b, qv, sv, scale_dtype, stem)
    value = b.node("Reshape", [value, b.ints([G * g, N])], f"{stem}_rows")
    if G * g != K:
        value = b.node("Slice", [value, b.ints([0]), b.ints([K]), b.ints([0])], f"{stem}_cut")
    if scale_dtype != dtype:
        value = b.node("Cast", [value], f"{stem}_to", to=ir.DataType.from_numpy(dtype))
    return value


def dequantize_nodes(b: _Builder, q: ir.Value, scales: ir.Value, scale_dtype, stem: str) -> ir.Value:
    """``q * scales`` rounded once to the scale dtype, as ``DequantizeLinear`` computes it.

    float16 scales are multiplied in float32 (exact for 8-bit integers) and rounded to float16
    by a final ``Cast``: onnxruntime's CPU provider has no float16 ``Mul`` and would leave a
    float16 product unfolded, to run at every call.
    """
    scale_dtype = np.dtype(scale_dtype)
    compute = np.dtype(np.float32) if scale_dtype == np.float16 else scale_dtype
    value = b.node("Cast", [q], f"{stem}_qf", to=ir.DataType.from_numpy(compute))
    if compute != scale_dtype:
        scales = b.node("Cast", [scales], f"{stem}_sf", to=ir.DataType.from_numpy(compute))
    value = b.node("Mul", [value, scales], f"{stem}_deq")
    if compute != scale_dtype:
        value = b.node("Cast", [value], f"{stem}_round", to=ir.DataType.from_numpy(scale_dtype))
    return value


def _slice_columns(arr: StoredArray, cols: slice) -> StoredArray:
    """Columns ``cols`` of a stored array (groups run along rows, so scales slice alike)."""
    scales = None if arr.scales is None else arr.scales[:, cols]
    return StoredArray(arr.storage, arr.values[:, cols], scales, arr.group)


def _same_storage(a: StoredArray, b: StoredArray) -> bool:
    if a.storage != b.storage or a.values.dtype != b.values.dtype:
        return False
    return not a.storage.is_int or (a.group == b.group and a.scales.dtype == b.scales.dtype)


def _stack_rows(arrays: list[StoredArray]) -> StoredArray | None:
    """Integer arrays of one storage and group stacked along rows, when every group boundary
    of the stack falls inside one array (all but the last have a multiple of ``g`` rows)."""
    first = arrays[0]
    if any(a.storage != first.storage or a.group != first.group or a.scales.dtype != first.scales.dtype for a in arrays):
        return None
    if any(a.shape[0] % first.group for a in arrays[:-1]):
        return None
    return StoredArray(first.storage, np.vstack([a.values for a in arrays]), np.vstack([a.scales for a in arrays]), first.group)


@dataclass(frozen=True, eq=False)
class _Piece:
    """A term restricted to columns ``[c0, c1)`` (terms are cut where column ranges overlap)."""

    term: Term
    c0: int
    c1: int

    @property
    def right(self) -> StoredArray:
        t = self.term
        return _slice_columns(t.right, slice(self.c0 - t.c0, self.c1 - t.c0))


class _BlocksEmitter:
    def __init__(self, hm, x: ir.Value, builder: _Builder, context: EmitContext):
        self.hm = hm
        self.b = builder
        self.x = x
        self.context = context
        self._slices: dict[tuple[int, int], ir.Value] = {}
        self._left: dict[int, ir.Value] = {}

    def fused(self, arr: StoredArray) -> bool:
        return arr.storage.is_int and self.context.fuse_int

    def array(self, arr: StoredArray, stem: str) -> ir.Value:
        return stored_array_nodes(self.b, arr, stem, fuse=self.context.fuse_int, opset=self.context.opset)

    def record(self, **values) -> None:
        """Add to the cost of what the nodes execute (``cost.Cost``), when it is recorded."""
        if self.b.cost is not None:
            self.b.cost.add(**values)

    def matmul(self, left: ir.Value, right: ir.Value, arrays: list[StoredArray], stem: str = "y") -> ir.Value:
        """``left @ right`` where ``right`` holds ``arrays`` stacked along rows."""
        rows = sum(a.shape[0] for a in arrays)
        cols = arrays[0].shape[1]
        itemsize = self.b.dtype.itemsize
        held = sum(a.nbytes if self.fused(a) else a.values.size * itemsize for a in arrays)
        self.record(nodes=1, gemms=1, macs=rows * cols, weight_bytes=held)
        return self.b.node("MatMul", [left, right], stem)

    def run(self) -> ir.Value:
        m, n = self.hm.shape
        if self.hm.row_perm is not None:
            self.x = self.b.node("Gather", [self.x, self.b.index("row_idx", self.hm.row_perm)], "row_perm", axis=-1)
            self.record(nodes=1, gathered=m, copies=m)
        pieces = [_Piece(t, t.c0, t.c1) for t in terms_of(self.hm)]
        y = self.assemble(0, n, pieces)
        if self.hm.col_perm is not None:
            inverse = np.empty(n, dtype=np.int64)
            inverse[self.hm.col_perm] = np.arange(n)
            y = self.b.node("Gather", [y, self.b.index("col_idx", inverse)], "col_perm", axis=-1)
            self.record(nodes=1, gathered=n, copies=n)
        return y

    def rows(self, r0: int, r1: int) -> ir.Value:
        """``x[..., r0:r1]``, sliced once per range."""
        if (r0, r1) == (0, self.hm.shape[0]):
            return self.x
        if (r0, r1) not in self._slices:
            b = self.b
            self._slices[(r0, r1)] = b.node("Slice", [self.x, b.ints([r0]), b.ints([r1]), b.ints([-1])], "x_rows")
            self.record(nodes=1, copies=r1 - r0)
        return self._slices[(r0, r1)]

    def zeros(self, width: int) -> ir.Value:
        """A tensor of zeros shaped ``(..., width)`` (x's leading dimensions)."""
        zero = StoredArray.exact(np.zeros((1, width), dtype=self.b.dtype))
        return self.matmul(self.rows(0, 1), self.b.weight("zero", zero.values), [zero], "zeros")

    def stacked(self, arrays: list[StoredArray], stem: str) -> ir.Value:
        """The arrays stacked along rows, one constant (folded at load when storages differ):
        runs of float or of float16 arrays are stacked in numpy, integer ones where groups align."""
        runs: list[list[StoredArray]] = []
        for a in arrays:
            if runs and _same_storage(runs[-1][-1], a) and (not a.storage.is_int or _stack_rows(runs[-1] + [a]) is not None):
                runs[-1].append(a)
            else:
                runs.append([a])
        values = []
        for run in runs:
            if run[0].storage.is_int:
                merged = _stack_rows(run)
            else:
                merged = StoredArray(run[0].storage, np.vstack([a.values for a in run]))
            values.append(self.array(merged, stem))
        return values[0] if len(values) == 1 else self.b.node("Concat", values, f"{stem}_stack", axis=0)

    def left_factor(self, term: Term) -> ir.Value:
        """``x_b @ U_t`` of a low-rank term, computed once even when its columns are split."""
        if term.index not in self._left:
            u = self.array(term.a, "u")
            self._left[term.index] = self.matmul(self.rows(term.r0, term.r1), u, [term.a], "xu")
        return self._left[term.index]

    def assemble(self, c0: int, c1: int, pieces: list[_Piece]) -> ir.Value:
        """``yp[..., c0:c1]`` from the pieces lying inside ``[c0, c1)``."""
        full = [p for p in pieces if (p.c0, p.c1) == (c0, c1)]
        rest = [p for p in pieces if (p.c0, p.c1) != (c0, c1)]
        terms = []
        if full:
            terms.append(self.column_product(full))
        if rest:
            parts = [self.assemble(a, z, inside) if inside else self.zeros(z - a) for a, z, inside in _partition(c0, c1, rest)]
            if len(parts) > 1:
                self.record(nodes=1, copies=c1 - c0)
            terms.append(parts[0] if len(parts) == 1 else self.b.node("Concat", parts, "concat", axis=-1))
        if not terms:
            return self.zeros(c1 - c0)
        if len(terms) == 1:
            return terms[0]
        # Sum, not Add: onnxruntime fuses MatMul + Add into Gemm before it fuses a
        # DequantizeLinear into MatMulNBits, which would leave an integer array unfused.
        self.record(nodes=1, copies=c1 - c0)
        return self.b.node("Sum", terms, "sum")

    def column_product(self, pieces: list[_Piece]) -> ir.Value:
        """``sum_b x_b @ B`` for pieces sharing one column range: one MatMul for the float-like
        arrays (float, float16, integers dequantized at load), one per fused integer array."""
        lefts, rights, products = [], [], []
        for p in pieces:
            if p.term.kind == BlockKind.LOWRANK:
                if self.fused(p.term.b):
                    products.append(self.matmul(self.left_factor(p.term), self.array(p.right, "vt"), [p.right]))
                else:
                    lefts.append(self.left_factor(p.term))
                    rights.append(p.right)
        dense = sorted((p for p in pieces if p.term.kind == BlockKind.DENSE), key=lambda p: p.term.r0)
        for run in _runs(dense, self.fused):
            r0, r1 = run[0].term.r0, run[-1].term.r1
            arrays = [p.right for p in run]
            if self.fused(arrays[0]):
                stacked = _stack_rows(arrays)
                groups = [(r0, r1, stacked)] if stacked is not None else [(p.term.r0, p.term.r1, a) for p, a in zip(run, arrays)]
                for a0, a1, arr in groups:
                    products.append(self.matmul(self.rows(a0, a1), self.array(arr, "w"), [arr]))
            else:
                lefts.append(self.rows(r0, r1))
                rights += arrays
        if lefts:
            if len(lefts) > 1:
                self.record(nodes=1, copies=sum(a.shape[0] for a in rights))
            left = lefts[0] if len(lefts) == 1 else self.b.node("Concat", lefts, "concat", axis=-1)
            stem = "vt" if all(p.term.kind == BlockKind.LOWRANK for p in pieces) else "w"
            products.insert(0, self.matmul(left, self.stacked(rights, stem), rights))
        if len(products) == 1:
            return products[0]
        self.record(nodes=1, copies=pieces[0].c1 - pieces[0].c0)
        return self.b.node("Sum", products, "sum")


def _runs(dense: list[_Piece], fused) -> list[list[_Piece]]:
    """Dense pieces of one column range with adjacent row ranges, in runs that share a slice
    (fused integer arrays only with the same storage and group)."""
    runs: list[list[_Piece]] = []
    for p in dense:
        if runs:
            last = runs[-1][-1]
            same_kind = fused(last.right) == fused(p.right)
            if fused(p.right):
                same_kind = same_kind and (last.right.storage, last.right.group) == (p.right.storage, p.right.group)
            if last.term.r1 == p.term.r0 and same_kind:
                runs[-1].append(p)
                continue
        runs.append([p])
    return runs


def _split_columns(p: _Piece, cuts: list[int]) -> list[_Piece]:
    """``p`` cut at the column positions ``cuts``."""
    edges = [p.c0] + [c for c in cuts if p.c0 < c < p.c1] + [p.c1]
    return [_Piece(p.term, a, z) for a, z in zip(edges[:-1], edges[1:])]


def _partition(c0: int, c1: int, pieces: list[_Piece]) -> list[tuple[int, int, list[_Piece]]]:
    """Split ``[c0, c1)`` into consecutive parts that no piece crosses, each with its pieces.

    Parts are the unions of overlapping column ranges, plus the uncovered gaps (no pieces).
    When one union is all of ``[c0, c1)`` (ranges that overlap without nesting), the pieces
    are first cut at every column boundary, which always yields at least two parts.
    """
    spans: list[list[int]] = []
    for a, z in sorted((p.c0, p.c1) for p in pieces):
        if spans and a < spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], z)
        else:
            spans.append([a, z])
    if spans == [[c0, c1]]:
        cuts = sorted({c for p in pieces for c in (p.c0, p.c1)})
        return _partition(c0, c1, [q for p in pieces for q in _split_columns(p, cuts)])
    parts, position = [], c0
    for a, z in spans:
        if a > position:
            parts.append((position, a, []))
        parts.append((a, z, [p for p in pieces if a <= p.c0 and p.c1 <= z]))
        position = z
    if position < c1:
        parts.append((position, c1, []))
    return parts


def emit_blocks(hm, x: ir.Value, prefix: str, dtype, context: EmitContext | None = None) -> Emission:
    """The ``blocks`` family: one product per block tier, assembled per column range."""
    builder = _Builder(prefix, dtype)
    y = _BlocksEmitter(hm, x, builder, context or EmitContext()).run()
    assert builder.nodes and builder.nodes[-1].outputs[0] is y, "Bug: the result is not the last node's output"
    return Emission(builder.nodes, builder.initializers, y, family="blocks", inputs=builder.inputs)


def blocks_candidate(hm, dtype, context: EmitContext):
    """The ``blocks`` family as a cost-model candidate (emitted into a throwaway builder)."""
    from .cost import INITIALIZER_BYTES, NODE_BYTES, Candidate, Cost

    builder = _Builder("c", dtype)
    builder.cost = Cost()
    elem = ir.DataType.from_numpy(np.dtype(dtype))
    x = ir.Value(name="x", type=ir.TensorType(elem))
    _BlocksEmitter(hm, x, builder, context).run()
    stored = sum(int(v.const_value.nbytes) + INITIALIZER_BYTES for v in builder.initializers)
    return Candidate("blocks", None, stored + NODE_BYTES * len(builder.nodes), builder.cost)


def emit_batched(hm, x: ir.Value, prefix: str, dtype, context: EmitContext | None = None, plan=None) -> Emission | None:
    """The ``batched`` family (``emit_plan``), or ``None`` when ``hm`` has no batched plan."""
    from .emit_batched import emit_plan_nodes
    from .emit_plan import build_batched

    context = context or EmitContext()
    plan = plan or build_batched(hm, dtype, context.options)
    if plan is None:
        return None
    builder = _Builder(prefix, dtype)
    y = emit_plan_nodes(plan, builder, x, context.x_rank, context.opset)
    return Emission(builder.nodes, builder.initializers, y, family="batched", inputs=builder.inputs)


def emit_ops(hm, x: ir.Value, prefix: str, dtype, context: EmitContext | None = None) -> Emission:
    """Emit ``x @ W_H`` with standard ONNX ops (opset >= 11); see the module docstring.

    Returns:
        An ``Emission`` with no functions; its ``output`` is the last node's output.
    """
    from .cost import choose_family

    context = context or EmitContext()
    family, plan = choose_family(hm, dtype, context)
    if family == "batched":
        emission = emit_batched(hm, x, prefix, dtype, context, plan)
        if emission is not None:
            return emission
    return emit_blocks(hm, x, prefix, dtype, context)
