"""Standard-op decoding of packed layout v2 arrays: the model-local functions ``ai.dehm.Decode*``
and ``PackedArrays``, which builds every array of a layer from them.

ONNX has no bit-cast, so each decoder rebuilds ``K x N`` elements of one type from the bytes
of a layout-v2 ``data`` (``dehm_onnx/hmatrix/pack.py``) with integer and float arithmetic::

    A = DecodeXxx(data, spec)          spec = [offset, K, N] (int64), A: float32 (K, N)

bit for bit:

- ``DecodeFloat16``: ``(-1)^s * (1024 + m) * 2^(e - 25)``, or ``m * 2^-24`` when ``e = 0``
  (subnormals), from the 16 bits of two little-endian bytes; exact in float32.
- ``DecodeFloat32``: ``(-1)^s * (2^23 + m) * 2^(e - 150)``, or ``m * 2^-149`` when ``e = 0``,
  computed in float64 (every term is a normal float64, so the product is exact even for
  float32 subnormals) and cast to float32, which is exact.
- ``DecodeInt8``, ``DecodeInt4``: the integers, two's complement (int4: value ``i`` in the
  low nibble of byte ``i // 2`` when ``i`` is even, else the high nibble), as float32.

``PackedArrays`` decodes the bytes once per element type and cuts the arrays out (its
docstring); an integer array is then multiplied by the float32 or float16 scale of each
row's group, one float32 rounding, and for float16 scales rounded once more to float16 by a
``Cast`` and widened back (the product is exact in float32: at most 8 + 11 significant
bits), as ``storage.dequantize_groupwise`` computes it: ``pack.unpack``'s values exactly.

NaN and infinity are never stored (``storage.store`` refuses them), so exponent 31 (float16)
and 255 (float32) are not decoded as such: a span decoded as one type also covers bytes of
other types between its arrays, which give finite (or, for float32, infinite) values that
the ``Split`` discards. Integer work is done in int64 (``Div`` and ``Mod`` of non-negative
values); every op used exists unchanged from opset 13 on, and
``emit_function.fit_function_to_model`` sets the functions' opset to the model's.

The functions depend only on their inputs; called on an initializer ``data`` and ``Constant``
specs, onnxruntime inlines them and folds the decoding into constants when it creates the
session.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..hmatrix.pack import ArrayLocation, Elem, decode_format
from ..ops import hmatmul

__all__ = ["DECODER_NAMES", "PackedArrays", "decoder_functions", "split_values", "DECODE_OPSET"]

DECODE_OPSET = 13
# ``Constant``'s ``value_int``/``value_ints`` attributes exist from opset 12; before, tensors.
CONSTANT_ATTRIBUTES_OPSET = 12
INPUTS = ("data", "spec")
OUTPUT = "A"
# element type -> the function decoding elements of that type.
_NAMES = {
    Elem.FLOAT32: "DecodeFloat32",
    Elem.FLOAT16: "DecodeFloat16",
    Elem.INT8: "DecodeInt8",
    Elem.INT4: "DecodeInt4",
}
DECODER_NAMES = tuple(_NAMES.values())
_INT64_MAX = np.iinfo(np.int64).max


class _Body:
    """Nodes of one decoder, with short value names and each constant made once."""

    def __init__(self, opset: int):
        self.inputs = [ir.Value(name=name) for name in INPUTS]
        self.nodes: list[ir.Node] = []
        self._consts: dict[tuple, ir.Value] = {}
        self.attributes = opset >= CONSTANT_ATTRIBUTES_OPSET

    def op(self, op_type: str, inputs, domain: str = "", **attrs) -> ir.Value:
        out = ir.Value(name=f"t{len(self.nodes)}")
        self.nodes.append(ir.node(op_type, list(inputs), attrs, domain=domain, outputs=[out], name=""))
        return out

    def _constant(self, key: tuple, attrs: dict) -> ir.Value:
        if key not in self._consts:
            out = ir.Value(name=f"t{len(self.nodes)}")
            self.nodes.append(ir.node("Constant", [], attrs, outputs=[out], name=""))
            self._consts[key] = out
        return self._consts[key]

    def const(self, array: np.ndarray) -> ir.Value:
        """A tensor constant (the float tables)."""
        array = np.asarray(array)
        return self._constant(("tensor", array.dtype.str, array.shape, array.tobytes()), {"value": ir.tensor(array)})

    def int(self, value: int) -> ir.Value:
        """An int64 scalar (``value_int``, the smallest form in the file, from opset 12)."""
        if not self.attributes:
            return self.const(np.array(value, np.int64))
        return self._constant(("int", int(value)), {"value_int": int(value)})

    def ints(self, *values: int) -> ir.Value:
        """A 1-D int64 constant."""
        if not self.attributes:
            return self.const(np.array(values, np.int64))
        return self._constant(("ints", *values), {"value_ints": [int(v) for v in values]})

    def spec(self, start: int, stop: int) -> ir.Value:
        """``spec[start:stop]`` (int64)."""
        return self.op("Slice", [self.inputs[1], self.ints(start), self.ints(stop)])

    def bytes(self, count: ir.Value) -> ir.Value:
        """The array's ``count`` bytes from ``spec[0]`` on, as int64."""
        start = self.spec(0, 1)
        raw = self.op("Slice", [self.inputs[0], start, self.op("Add", [start, count])])
        return self.op("Cast", [raw], to=ir.DataType.INT64)

    def every(self, values: ir.Value, first: int, step: int) -> ir.Value:
        """``values[first::step]``."""
        return self.op("Slice", [values, self.ints(first), self.ints(_INT64_MAX), self.ints(0), self.ints(step)])

    def size(self) -> ir.Value:
        """``K * N`` (int64, one element)."""
        return self.op("Mul", [self.spec(1, 2), self.spec(2, 3)])

    def function(self, name: str, out: ir.Value) -> ir.Function:
        out.name = OUTPUT
        graph = ir.Graph(self.inputs, [out], nodes=self.nodes, opset_imports={"": DECODE_OPSET, hmatmul.DOMAIN: hmatmul.VERSION}, name=name)
        return ir.Function(hmatmul.DOMAIN, name, "", graph=graph, attributes=[])


def _float16(opset: int) -> ir.Function:
    b = _Body(opset)
    data = b.bytes(b.op("Mul", [b.size(), b.ints(2)]))
    lo, hi = b.every(data, 0, 2), b.every(data, 1, 2)
    sign = b.op("Div", [hi, b.int(128)])
    exponent = b.op("Div", [b.op("Mod", [hi, b.int(128)]), b.int(4)])
    mantissa = b.op("Add", [b.op("Mul", [b.op("Mod", [hi, b.int(4)]), b.int(256)]), lo])
    normal = b.op("Div", [b.op("Add", [exponent, b.int(31)]), b.int(32)])  # 1 when exponent >= 1
    significand = b.op("Add", [mantissa, b.op("Mul", [normal, b.int(1024)])])
    effective = b.op("Sub", [b.op("Add", [exponent, b.int(1)]), normal])  # max(exponent, 1)
    powers = b.const(np.ldexp(np.float32(1), np.arange(32) - 25).astype(np.float32))
    value = b.op("Mul", [b.op("Cast", [significand], to=ir.DataType.FLOAT), b.op("Gather", [powers, effective])])
    value = b.op("Mul", [value, b.op("Gather", [b.const(np.array([1, -1], np.float32)), sign])])
    return b.function("DecodeFloat16", b.op("Reshape", [value, b.spec(1, 3)]))


def _float32(opset: int) -> ir.Function:
    b = _Body(opset)
    data = b.bytes(b.op("Mul", [b.size(), b.ints(4)]))
    b0, b1, b2, b3 = (b.every(data, i, 4) for i in range(4))
    sign = b.op("Div", [b3, b.int(128)])
    exponent = b.op("Add", [b.op("Mul", [b.op("Mod", [b3, b.int(128)]), b.int(2)]), b.op("Div", [b2, b.int(128)])])
    mantissa = b.op("Mul", [b.op("Mod", [b2, b.int(128)]), b.int(65536)])
    mantissa = b.op("Add", [b.op("Add", [mantissa, b.op("Mul", [b1, b.int(256)])]), b0])
    normal = b.op("Div", [b.op("Add", [exponent, b.int(255)]), b.int(256)])
    significand = b.op("Add", [mantissa, b.op("Mul", [normal, b.int(1 << 23)])])
    effective = b.op("Sub", [b.op("Add", [exponent, b.int(1)]), normal])
    # 2^(effective - 150) = 2^(16 * (effective // 16) - 150) * 2^(effective % 16): two small tables.
    high = b.const(np.ldexp(1.0, 16 * np.arange(16) - 150))
    low = b.const(np.ldexp(1.0, np.arange(16)))
    power = b.op("Mul", [b.op("Gather", [high, b.op("Div", [effective, b.int(16)])]),
                         b.op("Gather", [low, b.op("Mod", [effective, b.int(16)])])])
    value = b.op("Mul", [b.op("Cast", [significand], to=ir.DataType.DOUBLE), power])
    value = b.op("Mul", [value, b.op("Gather", [b.const(np.array([1.0, -1.0])), sign])])
    value = b.op("Cast", [value], to=ir.DataType.FLOAT)
    return b.function("DecodeFloat32", b.op("Reshape", [value, b.spec(1, 3)]))


def _integer(elem: Elem, opset: int) -> ir.Function:
    b = _Body(opset)
    size = b.size()
    if elem == Elem.INT8:
        q = b.op("Sub", [b.op("Mod", [b.op("Add", [b.bytes(size), b.int(128)]), b.int(256)]), b.int(128)])
    else:
        one = b.ints(1)
        data = b.bytes(b.op("Div", [b.op("Add", [size, one]), b.ints(2)]))
        column = b.ints(-1, 1)
        low = b.op("Reshape", [b.op("Mod", [data, b.int(16)]), column])
        high = b.op("Reshape", [b.op("Div", [data, b.int(16)]), column])
        nibbles = b.op("Reshape", [b.op("Concat", [low, high], axis=1), b.ints(-1)])
        nibbles = b.op("Slice", [nibbles, b.ints(0), size])
        q = b.op("Sub", [b.op("Mod", [b.op("Add", [nibbles, b.int(8)]), b.int(16)]), b.int(8)])
    q = b.op("Reshape", [b.op("Cast", [q], to=ir.DataType.FLOAT), b.spec(1, 3)])
    return b.function(_NAMES[elem], q)


def _build(name: str, opset: int) -> ir.Function:
    if name == "DecodeFloat16":
        return _float16(opset)
    if name == "DecodeFloat32":
        return _float32(opset)
    return _integer(Elem.INT8 if name == "DecodeInt8" else Elem.INT4, opset)


def decoder_functions(names, opset: int = DECODE_OPSET) -> list[ir.Function]:
    """Fresh ``FunctionProto``s of the decoders ``names`` for a model whose default-domain
    opset is ``opset`` (>= 11)."""
    return [_build(name, opset) for name in DECODER_NAMES if name in set(names)]


class PackedArrays:
    """The arrays of one layer's layout-v2 ``data``, as float32 values computed by nodes
    appended to ``nodes`` (a function body's).

    Each element type is decoded once, over the span of ``data`` its arrays occupy (one call
    of its decoder); one ``Split`` cuts that buffer into every array (and every scale table)
    with the gaps between them, and an array is a ``Reshape`` of its piece, an integer one
    then multiplied by its rows' scales (``Gather`` of the scale rows when there are several
    groups) and, for float16 scales, rounded to float16 once — ``pack.unpack``'s values bit
    for bit. Decoding each array with its own call gave onnxruntime ~40-100 inlined nodes
    per array to fold (66 s to create a session for a 4096² layer of ~2,600 arrays).
    """

    def __init__(self, data: ir.Value, locations, opset: int, nodes: list[ir.Node]):
        self.data, self.opset, self.nodes = data, opset, nodes
        self.attributes = opset >= CONSTANT_ATTRIBUTES_OPSET
        self.decoders: set[str] = set()
        self._consts: dict[tuple, ir.Value] = {}
        self._values: dict[ArrayLocation, ir.Value] = {}
        self._count = 0
        pieces: dict[Elem, list[tuple[int, int, tuple]]] = {}  # element type -> (start, size, key)
        for where in locations:
            elem, scale_elem, group = decode_format(where.format)
            k, n = where.shape
            _add_piece(pieces, elem, where.offset, k * n, ("a", where))
            if group:
                _add_piece(pieces, scale_elem, where.scale_offset, -(-k // group) * n, ("s", where))
        self._pieces: dict[tuple, ir.Value] = {}
        for elem, items in pieces.items():
            self._split(elem, items)

    def value(self, where: ArrayLocation) -> ir.Value:
        """The array at ``where`` as float32 values (nodes made once)."""
        if where not in self._values:
            self._values[where] = self._array(where)
        return self._values[where]

    def _array(self, where: ArrayLocation) -> ir.Value:
        elem, scale_elem, group = decode_format(where.format)
        k, n = where.shape
        if k * n == 0:
            return self._tensor(np.zeros((k, n), np.float32))
        value = self._op("Reshape", [self._pieces[("a", where)], self._ints(k, n)])
        if not group:
            return value
        groups = -(-k // group)
        scales = self._op("Reshape", [self._pieces[("s", where)], self._ints(groups, n)])
        if groups > 1:
            scales = self._op("Gather", [scales, self._ints(*(np.arange(k) // group))], axis=0)
        value = self._op("Mul", [value, scales])
        if scale_elem == Elem.FLOAT16:
            value = self._op("Cast", [self._op("Cast", [value], to=ir.DataType.FLOAT16)], to=ir.DataType.FLOAT)
        return value

    def _split(self, elem: Elem, items: list) -> None:
        """Decode the span of ``data`` holding ``items`` as ``elem`` and cut it into them."""
        items = sorted(set(items), key=lambda item: item[0])
        per_byte = _PER_BYTE[elem]
        first = items[0][0]
        end = max(start + size for start, size, _ in items)
        byte0 = int(first / per_byte)
        count = end - first
        spec = self._ints(byte0, 1, count)
        name = _NAMES[elem]
        self.decoders.add(name)
        decoded = self._op(name, [self.data, spec], domain=hmatmul.DOMAIN)
        self._pieces.update(split_values(self.nodes, decoded, 1, items, first, self.opset, self._fresh, self._ints))

    def _fresh(self) -> ir.Value:
        self._count += 1
        return ir.Value(name=f"d{self._count}")

    def _op(self, op_type: str, inputs, domain: str = "", **attrs) -> ir.Value:
        out = self._fresh()
        self.nodes.append(ir.node(op_type, list(inputs), attrs, domain=domain, outputs=[out], name=""))
        return out

    def _ints(self, *values) -> ir.Value:
        key = ("ints", *(int(v) for v in values))
        if key not in self._consts:
            attrs = ({"value_ints": list(key[1:])} if self.attributes
                     else {"value": ir.tensor(np.array(key[1:], np.int64))})
            out = self._fresh()
            self.nodes.append(ir.node("Constant", [], attrs, outputs=[out], name=""))
            self._consts[key] = out
        return self._consts[key]

    def _tensor(self, array: np.ndarray) -> ir.Value:
        out = self._fresh()
        self.nodes.append(ir.node("Constant", [], {"value": ir.tensor(array)}, outputs=[out], name=""))
        return out


def split_values(nodes: list[ir.Node], buffer: ir.Value, axis: int, items, origin: int, opset: int,
                 fresh, ints) -> dict:
    """``{key: value}`` for ``items`` ``(start, size, key)``: pieces of ``buffer`` along
    ``axis``, whose first element is element ``origin``, cut by one ``Split`` appended to
    ``nodes`` (gaps between the pieces become unused outputs; one piece covering the buffer
    is the buffer itself). ``fresh()`` makes a value, ``ints(*v)`` an int64 constant.

    Raises:
        AssertionError: two items overlap.
    """
    items = sorted(items, key=lambda item: item[0])
    sizes, outputs, pieces, position = [], [], {}, origin
    for start, size, key in items:
        if start < position:
            raise AssertionError("Bug: packed arrays overlap")
        if start > position:
            sizes.append(start - position)
            outputs.append(fresh())
        sizes.append(size)
        outputs.append(fresh())
        pieces[key] = outputs[-1]
        position = start + size
    if len(sizes) == 1:
        return {items[0][2]: buffer}
    if opset >= 13:
        nodes.append(ir.node("Split", [buffer, ints(*sizes)], {"axis": axis}, outputs=outputs, name=""))
    else:
        nodes.append(ir.node("Split", [buffer], {"axis": axis, "split": sizes}, outputs=outputs, name=""))
    return pieces


# Elements per byte of each element type (arrays and scales start on 16-byte boundaries,
# so every start is a whole element index).
_PER_BYTE = {Elem.FLOAT32: 0.25, Elem.FLOAT16: 0.5, Elem.INT8: 1, Elem.INT4: 2}


def _add_piece(pieces: dict, elem: Elem, offset: int, size: int, key: tuple) -> None:
    """Record ``size`` elements of ``elem`` at byte ``offset`` (element index in its buffer)."""
    if size:
        pieces.setdefault(elem, []).append((int(offset * _PER_BYTE[elem]), size, key))
