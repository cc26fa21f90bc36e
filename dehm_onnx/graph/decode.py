"""Standard-op decoders of packed layout v2 arrays: the model-local functions ``ai.dehm.Decode*``.

ONNX has no bit-cast, so each decoder rebuilds the values of one array of a layout-v2 ``data``
(``dehm_onnx/hmatrix/pack.py``) from its bytes with integer and float arithmetic::

    A = DecodeXxx(data, spec)          A: float32, shape (K, N)

``spec`` is a small int64 tensor: ``[offset, K, N]`` for a float array, ``[offset, K, N,
scale_offset, groups, group]`` for an integer one (``decode_spec``). Every decoder returns
float32, and the values are exactly ``pack.unpack``'s, bit for bit:

- ``DecodeFloat16``: ``(-1)^s * (1024 + m) * 2^(e - 25)``, or ``m * 2^-24`` when ``e = 0``
  (subnormals), from the 16 bits of two little-endian bytes; exact in float32.
- ``DecodeFloat32``: ``(-1)^s * (2^23 + m) * 2^(e - 150)``, or ``m * 2^-149`` when ``e = 0``,
  computed in float64 (every term is a normal float64, so the product is exact even for
  float32 subnormals) and cast to float32, which is exact.
- ``DecodeInt8``, ``DecodeInt4``: two's complement (int4: value ``i`` in the low nibble of
  byte ``i // 2`` when ``i`` is even, else the high nibble) times the float32 scale of the
  row's group, one float32 rounding.
- ``DecodeInt8F16``, ``DecodeInt4F16``: the same with float16 scales: the product is exact in
  float32 (at most 8 + 11 significant bits), then rounded once to float16 by a ``Cast`` and
  widened back, as ``storage.dequantize_groupwise`` computes it.

NaN and infinity are never stored (``storage.store`` refuses them), so exponent 31 (float16)
and 255 (float32) are not decoded. Integer work is done in int64 (``Div`` and ``Mod`` of
non-negative values); every op used exists unchanged from opset 13 on, and
``emit_function.fit_function_to_model`` sets the functions' opset to the model's.

The functions depend only on their inputs; called on an initializer ``data`` and ``Constant``
specs, onnxruntime inlines them and folds the decoding into constants when it creates the
session.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..hmatrix.pack import Elem, decode_format
from ..ops import hmatmul

__all__ = ["DECODER_NAMES", "decoder_name", "decode_spec", "decode_call", "decoder_functions", "DECODE_OPSET"]

DECODE_OPSET = 13
# ``Constant``'s ``value_int``/``value_ints`` attributes exist from opset 12; before, tensors.
CONSTANT_ATTRIBUTES_OPSET = 12
INPUTS = ("data", "spec")
OUTPUT = "A"
# (element, scale element) -> function name; floats have no scale element.
_NAMES = {
    (Elem.FLOAT32, None): "DecodeFloat32",
    (Elem.FLOAT16, None): "DecodeFloat16",
    (Elem.INT8, Elem.FLOAT32): "DecodeInt8",
    (Elem.INT4, Elem.FLOAT32): "DecodeInt4",
    (Elem.INT8, Elem.FLOAT16): "DecodeInt8F16",
    (Elem.INT4, Elem.FLOAT16): "DecodeInt4F16",
}
DECODER_NAMES = tuple(_NAMES.values())
_INT64_MAX = np.iinfo(np.int64).max


def decoder_name(code: int) -> str:
    """The decoder function for an array of format ``code`` (``pack.format_code``)."""
    elem, scale_elem, group = decode_format(code)
    return _NAMES[(elem, scale_elem if group else None)]


def decode_spec(code: int, offset: int, k: int, n: int, scale_offset: int = 0) -> np.ndarray:
    """The ``spec`` input of the decoder of a ``(k, n)`` array of format ``code`` at ``offset``."""
    _, _, group = decode_format(code)
    if not group:
        return np.array([offset, k, n], np.int64)
    return np.array([offset, k, n, scale_offset, -(-k // group), group], np.int64)


def decode_call(data: ir.Value, spec: ir.Value, code: int, out: ir.Value) -> ir.Node:
    """The node ``out = DecodeXxx(data, spec)`` for an array of format ``code``."""
    return ir.node(decoder_name(code), [data, spec], domain=hmatmul.DOMAIN, outputs=[out], name="")


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


def _integer(elem: Elem, scale_elem: Elem, opset: int) -> ir.Function:
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
    scale_spec = b.op("Concat", [b.spec(3, 5), b.spec(2, 3)], axis=0)  # [scale_offset, groups, N]
    scale_name = _NAMES[(scale_elem, None)]
    scales = b.op(scale_name, [b.inputs[0], scale_spec], domain=hmatmul.DOMAIN)
    scalar = b.const(np.zeros(0, np.int64))
    rows = b.op("Reshape", [b.spec(1, 2), scalar])
    rows = b.op("Range", [b.int(0), rows, b.int(1)])
    rows = b.op("Div", [rows, b.spec(5, 6)])  # each row's scale group
    value = b.op("Mul", [q, b.op("Gather", [scales, rows], axis=0)])
    if scale_elem == Elem.FLOAT16:
        value = b.op("Cast", [b.op("Cast", [value], to=ir.DataType.FLOAT16)], to=ir.DataType.FLOAT)
    return b.function(_NAMES[(elem, scale_elem)], value)


def _build(name: str, opset: int) -> ir.Function:
    if name == "DecodeFloat16":
        return _float16(opset)
    if name == "DecodeFloat32":
        return _float32(opset)
    (elem, scale_elem), = [key for key, value in _NAMES.items() if value == name]
    return _integer(elem, scale_elem, opset)


def decoder_functions(names, opset: int = DECODE_OPSET) -> list[ir.Function]:
    """Fresh ``FunctionProto``s of the decoders ``names`` and of the scale decoders they call,
    for a model whose default-domain opset is ``opset`` (>= 11)."""
    needed = set(names)
    for name in list(needed):
        elem, scale_elem = next(key for key, value in _NAMES.items() if value == name)
        if scale_elem is not None:
            needed.add(_NAMES[(scale_elem, None)])
    return [_build(name, opset) for name in DECODER_NAMES if name in needed]
