"""Function emission: one ``HMatMul`` node per layer plus a model-local function body.

    y = HMatMul(x, data, layout, row_perm, col_perm)    (node.overload = the layer's prefix)

The node follows the op contract in ``dehm_onnx/ops/hmatmul.py``; the four packed arrays
(``dehm_onnx/hmatrix/pack.py``) are the layer's only weight initializers, in layout version 1
(``data`` in the activation dtype) when every stored array is in the weight's dtype, else in
layout version 2 (``data`` uint8, every array in its float16/int8/int4 storage), exactly as
``--emit custom`` writes them. The model also gets a ``FunctionProto`` with the same domain,
name and overload (model IR version 10) whose body computes the same product with standard
ops:

- stock onnxruntime inlines the body, so the file runs everywhere;
- with the custom-op library registered (``dehm_onnx.make_session``), the compiled kernel
  runs instead, for every overload.

The body is the standard-op emission of the same H-matrix with every array in float, in the
family ``body_family`` picks: the ``blocks`` family (``emit_ops.emit_blocks``), each factor
initializer replaced by nodes reading the function's ``data`` input (stacked factors by a
``Concat`` of such pieces, a factor cut at another block's column boundary by a ``Slice`` of
its columns), or a batched plan whose stacks are assembled from the arrays
(``emit_body.py``). Either way the weights are stored once; each array is

- layout v1: a ``Reshape`` of its piece of ``data``, cut by one ``Split`` per layer;
- layout v2: its piece of ``data`` decoded by ``decode.PackedArrays`` (one call per element
  type of the model-local ``ai.dehm.Decode*`` functions, stored once per model and shared by
  every layer, then a ``Split``; integers times their scales). A low-rank block of several
  tiers is ``sum_t (x_b @ U_t) @ Vt_t``.

The body computes in float32, as the kernels accumulate: a float16 ``X`` is cast to float32
first and ``Y`` back to float16 once at the end.

These nodes depend only on ``data``, an initializer, and onnxruntime folds them into constants
when the session is created (integers are multiplied as their dequantized float values, as
the folded form of the ``ops`` emission does). Index constants become ``Constant`` nodes.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from ..hmatrix import Block, BlockKind, StoredArray, pack
from ..hmatrix.pack import ArrayLocation, array_locations, unpack
from ..ops import hmatmul
from .decode import CONSTANT_ATTRIBUTES_OPSET, PackedArrays, decoder_functions, split_values
from .emit_body import BODY_BATCHED_OPSET, emit_batched_body
from .emit_ops import Emission, EmitContext, emit_blocks, emit_ops, initializer

__all__ = [
    "emit_function",
    "fit_function_to_model",
    "packed_inputs",
    "packed_inputs_v2",
    "FUNCTION_OPSET",
    "SUPPORTED_DTYPES",
    "FUNCTION_IR_VERSION",
]

logger = logging.getLogger(__name__)

# Default-domain opset the bodies are written for (every op used is unchanged since 13);
# ``fit_function_to_model`` sets it to the model's own version, as the checker requires.
FUNCTION_OPSET = 13
# A function body may hold up to this fraction more float bytes in memory than its smallest
# candidate when that buys cost.SPEEDUP times the speed: at tol 1e-2 the 4096² log kernel's
# batched body holds 35 % more than its per-block body and runs in about a sixth of the time by
# the time model (per-block: 1108 nodes, 3× slower than dense on stock onnxruntime).
BODY_MEMORY_SLACK = 1.0
# Node overloads and overloaded model-local functions need IR version 10.
FUNCTION_IR_VERSION = 10
SUPPORTED_DTYPES = hmatmul.SUPPORTED_DTYPES


def packed_inputs(hm, prefix: str, dtype) -> list[ir.Value]:
    """The four packed initializers of ``hm`` (``data`` stored in ``dtype``), in input order,
    named as ``dehm_onnx.ops.hmatmul.packed_initializers`` names them."""
    packed = pack(hm)
    arrays = (packed.data.astype(dtype), packed.layout, packed.row_perm, packed.col_perm)
    return [initializer(f"{prefix}.{field}", a) for a, field in zip(arrays, hmatmul.INPUTS[1:])]


def packed_inputs_v2(hm, prefix: str) -> list[ir.Value]:
    """The four layout-v2 initializers of ``hm`` (``data`` uint8), named as ``packed_inputs`` names them."""
    packed = pack(hm, version=2)
    arrays = (packed.data, packed.layout, packed.row_perm, packed.col_perm)
    return [initializer(f"{prefix}.{field}", a) for a, field in zip(arrays, hmatmul.INPUTS[1:])]


def hmatmul_node(x: ir.Value, prefix: str, packed: list[ir.Value], overload: str = "") -> ir.Node:
    """The layer's ``HMatMul`` node (contract: ``dehm_onnx.ops.hmatmul``)."""
    name = f"{prefix}/hmatmul"
    return ir.node(
        hmatmul.OP_TYPE, [x, *packed], domain=hmatmul.DOMAIN, overload=overload, name=name,
        outputs=[ir.Value(name=f"{prefix}/y")],
    )


class _FactorIndex:
    """Finds a stacked factor matrix as a run of stored factors (each from a ``source``)."""

    def __init__(self):
        self.by_first_row: dict[tuple[int, bytes], list[tuple[object, np.ndarray]]] = {}

    @classmethod
    def packed_v1(cls, hm, dtype) -> "_FactorIndex":
        """The factors of ``pack(hm)``, each found by its offset in ``data``."""
        index = cls()
        packed = pack(hm)
        for kind, r0, r1, c0, c1, rank, off in packed.layout.tolist():
            rows, cols = r1 - r0, c1 - c0
            if kind == BlockKind.DENSE:
                index.add(off, packed.data[off : off + rows * cols].reshape(rows, cols).astype(dtype))
            elif kind == BlockKind.LOWRANK and rank > 0:
                index.add(off, packed.data[off : off + rows * rank].reshape(rows, rank).astype(dtype))
                vt_off = off + rows * rank
                index.add(vt_off, packed.data[vt_off : vt_off + rank * cols].reshape(rank, cols).astype(dtype))
        return index

    def add(self, source, factor: np.ndarray) -> None:
        """Index ``factor`` (2-D, in the activation dtype), read from ``source``."""
        if factor.size:
            key = (factor.shape[1], factor[0].tobytes())
            self.by_first_row.setdefault(key, []).append((source, factor))

    def pieces(self, array: np.ndarray):
        """``[(source, shape, columns), ...]`` whose row-stacking equals ``array`` exactly, or
        None; ``columns`` is None for a whole factor, else the ``(start, stop)`` of the factor's
        columns to take (where the emission cut a block at a column boundary of another)."""
        if array.ndim != 2 or array.shape[0] == 0:
            return None
        return self._cover(array, 0)

    def _cover(self, array: np.ndarray, pos: int):
        """Pieces for the rows of ``array`` from ``pos`` on, or None. Factors that start with
        the same row are tried longest first, and the next is tried when the rest cannot be
        covered (a one-row factor may equal the first row of a taller one)."""
        if pos == array.shape[0]:
            return []
        candidates = self.by_first_row.get((array.shape[1], array[pos].tobytes()), [])
        for source, factor in sorted(candidates, key=lambda c: -c[1].shape[0]):
            end = pos + factor.shape[0]
            if end <= array.shape[0] and np.array_equal(array[pos:end], factor):
                rest = self._cover(array, end)
                if rest is not None:
                    return [(source, factor.shape, None), *rest]
        if not np.any(array):
            return None
        for window in self._windows(array, pos):
            rest = self._cover(array, pos + window[1][0])
            if rest is not None:
                return [window, *rest]
        return None

    def _windows(self, array: np.ndarray, pos: int):
        """Every wider factor some of whose columns equal the rows of ``array`` from ``pos``
        on, as ``(source, shape, columns)`` (the first one found may lead nowhere: a one-row
        factor's column can equal the first row of the next piece)."""
        width = array.shape[1]
        for factors in self.by_first_row.values():
            for source, factor in factors:
                rows = factor.shape[0]
                if factor.shape[1] <= width or pos + rows > array.shape[0]:
                    continue
                for start in range(factor.shape[1] - width + 1):
                    if np.array_equal(factor[:, start : start + width], array[pos : pos + rows]):
                        yield source, factor.shape, (start, start + width)


class _BodyBuilder:
    """Makes the ops emission's initializers the outputs of function-body nodes. Layout v1:
    one ``Split`` cuts ``data`` into every stored array (``places``: ``(offset, shape)`` of
    each), and a factor is a ``Reshape`` of its piece."""

    def __init__(self, index: _FactorIndex, data: ir.Value, places=(), opset: int = FUNCTION_OPSET,
                 widen: bool = False):
        self.index = index
        self.data = data
        self.nodes: list[ir.Node] = []
        self.widen = widen  # float16 data: cut it after one Cast to float32
        self.copied = 0  # float values stored again because no factor matched
        self.arrays: dict[tuple, ir.Value] = {}
        self.places = {offset: tuple(shape) for offset, shape in places if shape[0] * shape[1]}
        self.opset = opset
        self._pieces: dict[int, ir.Value] | None = None
        self._ints: dict[tuple, ir.Value] = {}

    def const(self, value: ir.Value | str, array: np.ndarray) -> ir.Value:
        """A ``Constant`` node writing ``array`` into ``value`` (a new value for a name)."""
        out = ir.Value(name=value) if isinstance(value, str) else value
        tensor = ir.tensor(np.ascontiguousarray(array), name=out.name)
        self.nodes.append(ir.node("Constant", [], {"value": tensor}, outputs=[out], name=""))
        return out

    def ints(self, *values: int) -> ir.Value:
        """A 1-D int64 ``Constant``, made once per value."""
        key = tuple(int(v) for v in values)
        if key not in self._ints:
            self._ints[key] = self.const(f"i{len(self._ints)}", np.array(key, np.int64))
        return self._ints[key]

    def source(self, offset: int, shape: tuple[int, int], stem: str, out: ir.Value) -> ir.Value:
        """The stored array of ``shape`` at ``offset`` of ``data`` (its nodes made once)."""
        return self.array(offset, shape)

    def array(self, offset: int, shape: tuple[int, int]) -> ir.Value:
        """The stored array of ``shape`` at ``offset`` of ``data`` (its nodes made once)."""
        key = (offset, tuple(shape))
        if key not in self.arrays:
            self.arrays[key] = self._node("Reshape", [self._piece(offset, shape), self.ints(*shape)])
        return self.arrays[key]

    def _piece(self, offset: int, shape: tuple[int, int]) -> ir.Value:
        if self._pieces is None:
            items = [(off, rows * cols, off) for off, (rows, cols) in self.places.items()]
            count = iter(range(1 << 62))
            data = self._node("Cast", [self.data], to=ir.DataType.FLOAT) if self.widen else self.data
            self._pieces = split_values(self.nodes, data, 0, items, 0, self.opset,
                                        lambda: ir.Value(name=f"p{next(count)}"), self.ints)
        assert self.places.get(offset) == tuple(shape), "Bug: a factor is not a stored array"
        return self._pieces[offset]

    def _node(self, op: str, inputs: list[ir.Value], **attrs) -> ir.Value:
        out = ir.Value(name=f"n{len(self.nodes)}")
        self.nodes.append(ir.node(op, inputs, attrs, outputs=[out], name=""))
        return out

    def factor(self, value: ir.Value, array: np.ndarray) -> None:
        pieces = self.index.pieces(array)
        if pieces is None:
            if np.any(array):
                self.copied += array.size
            self.const(value, array)
            return
        parts = []
        for i, (source, shape, columns) in enumerate(pieces):
            stem = value.name if len(pieces) == 1 else f"{value.name}/part{i}"
            out = value if len(pieces) == 1 and columns is None else ir.Value(name=stem)
            part = self.source(source, shape, stem, out)
            if columns is not None:
                out = value if len(pieces) == 1 else ir.Value(name=f"{stem}/columns")
                start, stop = (self.const(f"{out.name}/{n}", np.array([c], np.int64)) for n, c in zip(("c0", "c1"), columns))
                axis = self.const(f"{out.name}/axis", np.array([1], np.int64))
                self.nodes.append(ir.node("Slice", [part, start, stop, axis], outputs=[out], name=""))
                part = out
            parts.append(part)
        if len(parts) > 1:
            self.nodes.append(ir.node("Concat", parts, {"axis": 0}, outputs=[value], name=""))
        elif parts[0] is not value:
            ir.convenience.replace_all_uses_with(value, parts[0])


class _DecodingBodyBuilder(_BodyBuilder):
    """Layout v2: every stored array is built (in float32) from the bytes of ``data`` by
    ``decode.PackedArrays`` (one decoder call per element type)."""

    def __init__(self, index: _FactorIndex, data: ir.Value, opset: int, locations):
        super().__init__(index, data)
        self.attributes = opset >= CONSTANT_ATTRIBUTES_OPSET
        self.arrays_v2 = PackedArrays(data, locations, opset, self.nodes)

    def const(self, value: ir.Value | str, array: np.ndarray) -> ir.Value:
        """A ``Constant`` node: ``value_ints`` for a 1-D int64 array (opset >= 12), else an
        unnamed tensor."""
        out = ir.Value(name=value) if isinstance(value, str) else value
        array = np.ascontiguousarray(array)
        if self.attributes and array.dtype == np.int64 and array.ndim == 1 and array.size:
            attrs = {"value_ints": [int(v) for v in array]}
        else:
            attrs = {"value": ir.tensor(array)}
        self.nodes.append(ir.node("Constant", [], attrs, outputs=[out], name=""))
        return out

    def source(self, where: ArrayLocation, shape: tuple[int, int], stem: str, out: ir.Value) -> ir.Value:
        """The array at ``where`` (float32)."""
        return self.arrays_v2.value(where)


def function_body(hm, dtype, overload: str, opset: int = FUNCTION_OPSET, family: str = "auto") -> ir.Function:
    """The model-local function ``ai.dehm.HMatMul`` (this overload) computing ``X @ W_H`` from
    the layout-v1 inputs of ``hm`` (every array in the weight's dtype) in a model of
    default-domain ``opset``; ``family`` as for ``body_family``."""
    inputs = [ir.Value(name=name) for name in hmatmul.INPUTS]
    packed = pack(hm)
    stored = dataclasses.replace(unpack(packed), dtype=np.dtype(np.float32))
    places = {}
    for b, (_, r0, r1, c0, c1, rank, off) in zip(stored.blocks, packed.layout.tolist()):
        shapes = [(r1 - r0, c1 - c0)] if b.kind == BlockKind.DENSE else [(r1 - r0, rank), (rank, c1 - c0)]
        for arr, shape, start in zip(b.storage, shapes, (off, off + (r1 - r0) * rank)):
            places[id(arr)] = (start, shape)
    body = _BodyBuilder(_FactorIndex.packed_v1(hm, np.float32), inputs[1], places.values(), opset,
                        widen=np.dtype(dtype) != np.float32)
    function = _body_function(stored, dtype, overload, inputs, body, opset, family, lambda arr: body.array(*places[id(arr)]))
    _shorten_names(function)
    return function


def function_body_v2(hm, dtype, overload: str, opset: int, family: str = "auto") -> tuple[ir.Function, list[str]]:
    """The function body for the layout-v2 inputs of ``hm`` (``packed_inputs_v2``) in a model
    of default-domain ``opset``, and the names of the ``ai.dehm.Decode*`` functions it calls.

    The product is the emission (``body_family``) of the H-matrix that ``unpack`` reads back
    from the packed bytes, every array as its float32 values (one term per tier), and each of
    its factors is built from the decoded arrays.
    """
    packed = pack(hm, version=2)
    stored = unpack(packed)
    locations = array_locations(packed)
    arrays = [a for b in stored.blocks for a in b.storage]
    assert len(arrays) == len(locations), "Bug: unpack and array_locations list different arrays"
    index = _FactorIndex()
    for where, array in zip(locations, arrays):
        index.add(where, array.dequantized().astype(np.float32))
    floats = dataclasses.replace(stored, dtype=np.dtype(np.float32), blocks=tuple(_exact_block(b) for b in stored.blocks))
    places = {id(a): where for a, where in zip((a for b in floats.blocks for a in b.storage), locations)}
    inputs = [ir.Value(name=name) for name in hmatmul.INPUTS]
    body = _DecodingBodyBuilder(index, inputs[1], opset, locations)
    function = _body_function(floats, dtype, overload, inputs, body, opset, family,
                              lambda arr: body.arrays_v2.value(places[id(arr)]))
    function.opset_imports[hmatmul.DOMAIN] = hmatmul.VERSION
    _shorten_names(function)
    return function, sorted(body.arrays_v2.decoders)


def body_family(hm, dtype, opset: int, family: str = "auto") -> tuple[str, object]:
    """``("batched", plan)`` or ``("blocks", None)``: the family of a function body for ``hm``
    (its arrays in float, as the body computes). ``family`` ``auto`` takes the ``ops`` cost
    model's choice (``cost.choose_family``, an activation of unknown rank), or the fastest
    candidate whose float bytes are within ``BODY_MEMORY_SLACK`` of the smallest when its time
    estimate is ``cost.SPEEDUP`` times lower: for a body those bytes are the memory onnxruntime
    fills when it folds the constants, not the file's (the file holds the packed arrays either
    way; a batched body's own nodes take more bytes than a small per-block one's). ``batched``
    forces the best batched plan where there is one and the opset allows it
    (``BODY_BATCHED_OPSET``)."""
    from .cost import choose_family

    if opset < BODY_BATCHED_OPSET or family == "blocks":
        return "blocks", None
    family = "batched" if family == "batched" else "auto"
    return choose_family(hm, dtype, EmitContext(x_rank=None, opset=opset, family=family), memory_slack=BODY_MEMORY_SLACK)


def _shorten_names(function: ir.Function) -> None:
    """Empty node names and ``v<i>`` value names inside a body: names are local to a function,
    and the layer prefix repeated in every name took half of a filterbank body's bytes."""
    outputs = set(map(id, function.outputs))
    count = 0
    for node in function:
        node.name = ""
        for value in node.outputs:
            if id(value) not in outputs:
                value.name = f"v{count}"
                count += 1


def _exact_block(b):
    """``b`` with every stored array replaced by its dequantized values in float32 (FLOAT)."""
    arrays = tuple(StoredArray.exact(a.dequantized().astype(np.float32)) for a in b.storage)
    return Block(b.kind, b.r0, b.r1, b.c0, b.c1, storage=arrays)


def _body_function(hm, dtype, overload: str, inputs: list[ir.Value], body: _BodyBuilder, opset: int,
                   family: str, array_value) -> ir.Function:
    """The function computing ``X @ W_H`` with the arrays of ``hm`` (float32): in float32, as
    the kernels accumulate, with float16 ``X`` widened first and ``Y`` rounded once."""
    x = inputs[0]
    if np.dtype(dtype) != np.float32:
        x = body._node("Cast", [x], to=ir.DataType.FLOAT)
    family, plan = body_family(hm, np.float32, opset, family)
    if family == "batched" and plan is not None:
        y = emit_batched_body(plan, x, body.nodes, array_value, opset)
        nodes = body.nodes
    else:
        nodes, y = _blocks_body(hm, overload, x, body)
    if np.dtype(dtype) != np.float32:
        cast = ir.node("Cast", [y], {"to": ir.DataType.from_numpy(np.dtype(dtype))}, outputs=[ir.Value(name="y16")], name="")
        nodes.append(cast)
        y = cast.outputs[0]
    (y_name,) = hmatmul.OUTPUTS
    y.name = y_name
    graph = ir.Graph(inputs, [y], nodes=nodes, opset_imports={"": FUNCTION_OPSET}, name=hmatmul.OP_TYPE)
    return ir.Function(hmatmul.DOMAIN, hmatmul.OP_TYPE, overload, graph=graph, attributes=[])


def _blocks_body(hm, prefix: str, x: ir.Value, body: _BodyBuilder):
    """The ``blocks`` emission (float32) with each factor initializer replaced by body nodes."""
    emission = emit_blocks(hm, x, prefix, np.float32, EmitContext(family="blocks"))
    for value in emission.initializers:
        array = value.const_value.numpy()
        value.const_value = None  # the value becomes a body node's output
        if np.issubdtype(array.dtype, np.floating):
            body.factor(value, array)
        else:
            body.const(value, array)
    if body.copied:
        logger.info("function body of %r repeats %d weight values not found in the packed data", prefix, body.copied)
    return body.nodes + emission.nodes, emission.output


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


def emit_function(hm, x: ir.Value, prefix: str, dtype, context=None) -> Emission:
    """Emit ``x @ W_H`` as one ``HMatMul`` node plus its model-local function body.

    Packed layout v1 when every array of ``hm`` is in the weight's dtype, else layout v2 with
    the ``ai.dehm.Decode*`` functions its body calls. For activation dtypes the op does not
    support (anything but float32/float16) this falls back to the ``ops`` emission.
    """
    dtype = np.dtype(dtype)
    context = context or EmitContext()
    opset, family = context.opset, context.family
    if dtype not in SUPPORTED_DTYPES:
        logger.info("HMatMul does not support %s; %r uses the ops emission", dtype, prefix)
        return emit_ops(hm, x, prefix, dtype, context)
    if all(b.is_float for b in hm.blocks):
        packed = packed_inputs(hm, prefix, dtype)
        functions = [function_body(as_float(hm), dtype, prefix, opset, family)]
    else:
        packed = packed_inputs_v2(hm, prefix)
        body, decoders = function_body_v2(hm, dtype, prefix, opset, family)
        functions = [body, *decoder_functions(decoders, opset)]
    node = hmatmul_node(x, prefix, packed, overload=prefix)
    return Emission([node], packed, node.outputs[0], functions, family="function", inputs=list(packed))


def as_float(hm):
    """``hm`` with every array in float (its dequantized values), as packed layout v1 holds it."""
    blocks = []
    for b in hm.blocks:
        if b.kind == BlockKind.DENSE:
            blocks.append(Block(b.kind, b.r0, b.r1, b.c0, b.c1, dense=b.dense.astype(hm.dtype)))
        elif b.kind == BlockKind.LOWRANK:
            blocks.append(Block(b.kind, b.r0, b.r1, b.c0, b.c1, u=b.u.astype(hm.dtype), vt=b.vt.astype(hm.dtype)))
        else:
            blocks.append(b)
    return dataclasses.replace(hm, blocks=tuple(blocks))
