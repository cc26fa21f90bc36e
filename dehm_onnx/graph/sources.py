"""Where a MatMul/Gemm weight comes from: ``WeightSource``, the one seam for every kind.

A weight input is a *source* when it is computable from stored constants alone, through a
chain of the steps exporters and quantizers write::

    stored tensor (initializer or Constant node)
      -> [DequantizeLinear(·, scale, zero_point)]   int8/uint8/int4/uint4, per tensor/axis/block
      -> [Cast(·)]                                  e.g. float16 -> float32, int8 -> float32
      -> [Mul(·, scale)]                            a constant factor (Cast(int8) * scale)
      -> [Reshape(·, constant shape)]               e.g. to 2-D
      -> [Transpose(·)]                             e.g. dynamo with optimize=False
      -> [Identity(·)]                              e.g. tied weights of the legacy exporter

in any order and composition (at most ``MAX_STEPS`` steps). Every auxiliary input (scale,
zero point, shape, factor) must itself be a constant that is not a graph input. The weight
is then the float tensor the chain computes; ``dehm_onnx.compression.weights`` computes it
with numpy the way onnxruntime does, so the certified bound is against that tensor.

The source says what it is in words (``kind``: ``"initializer"``, ``"constant"``,
``"dequantize int8 per-axis"``, ``"transpose(initializer)"``, ...), which the report prints.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..compression.weights import Cast, Dequantize, Reshape, Scale, Transpose, WeightRecipe, WeightSlice
from ..errors import InvalidModelError

__all__ = ["MAX_STEPS", "WeightSource", "find_source", "constant_tensor"]

MAX_STEPS = 8
_DEFAULT_DOMAINS = ("", "ai.onnx")
_QUANTIZED = {ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4, ir.DataType.UINT4}
_PACKED = {ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.FLOAT4E2M1}


@dataclass(eq=False)
class WeightSource:
    """A weight input and the chain of constant steps computing it.

    Attributes:
        value: the tensor the MatMul/Gemm node reads.
        stored: the initializer (or ``Constant`` output) the chain starts from.
        nodes: the step nodes, from ``stored`` to ``value`` (empty for a plain constant).
        steps: the numpy steps of the nodes (``dehm_onnx.compression.weights``); an
            ``Identity`` adds none.
        kind: what the source is, in words (the report's ``source``).
        shape: shape of ``value``.
        dtype: numpy dtype of ``value``.
    """

    value: ir.Value
    stored: ir.Value
    nodes: tuple
    steps: tuple
    kind: str
    shape: tuple
    dtype: np.dtype

    @property
    def name(self) -> str:
        """The stored tensor's name (what the report calls the weight)."""
        return self.stored.name

    @property
    def constant_node(self) -> ir.Node | None:
        """The ``Constant`` node holding the stored tensor, or None for an initializer."""
        return None if self.stored.is_initializer() else self.stored.producer()

    @property
    def graph(self) -> ir.Graph:
        """The graph that defines the stored tensor."""
        node = self.constant_node
        return node.graph if node is not None else self.stored.graph

    @property
    def is_graph_input(self) -> bool:
        """The stored tensor is also a graph input (a caller may replace it at run time)."""
        return self.stored.is_graph_input()

    @property
    def share_key(self) -> tuple:
        """Sources with equal keys compute the same tensor from the same stored one."""
        return (id(self.stored),) + tuple(id(n) for n in self.nodes if n.op_type != "Identity")

    def recipe(self, transpose: bool = False) -> WeightRecipe:
        """How a worker process computes the weight (``.T`` with ``transpose``)."""
        steps = self.steps + ((Transpose((1, 0)),) if transpose else ())
        shape = self.shape[::-1] if transpose else self.shape
        return WeightRecipe(_stored_array(self.stored), steps, tuple(int(d) for d in shape))

    def array(self) -> np.ndarray:
        """The weight as the node reads it (memory-mapped when external and stored as is)."""
        return self.recipe().open()

    def remove_unused(self) -> None:
        """Remove the step nodes and constants of the chain that nothing reads any more."""
        for node in reversed(self.nodes):
            if not _is_read(node.outputs):
                inputs = list(node.inputs)
                node.graph.remove(node, safe=True)
                for value in inputs[1:]:
                    _remove_constant(value)
        _remove_constant(self.stored)


def _is_read(values) -> bool:
    return any(v is not None and (v.uses() or v.is_graph_output()) for v in values)


def _remove_constant(value: ir.Value | None) -> None:
    """Drop an initializer, or the Constant/Concat-of-constants node, that nothing reads any more."""
    if value is None or _is_read([value]) or value.is_graph_input():
        return
    if value.is_initializer():
        value.graph.initializers.pop(value.name)
        return
    node = value.producer()
    if node is not None and node.op_type in ("Constant", "Concat") and node.graph is not None and not _is_read(node.outputs):
        inputs = list(node.inputs)
        node.graph.remove(node, safe=True)
        for operand in inputs:
            _remove_constant(operand)


def constant_tensor(value: ir.Value | None, allow_input: bool = False) -> ir.TensorProtocol | None:
    """The tensor of an initializer or of a ``Constant`` node's output.

    An initializer that is also a graph input counts only with ``allow_input`` (its value
    may be replaced at run time; the pass reports such a weight and leaves it alone).
    """
    if value is None or (value.is_graph_input() and not allow_input):
        return None
    if value.const_value is not None:
        return value.const_value if value.is_initializer() else None
    node = value.producer()
    if node is None or node.op_type != "Constant" or node.domain not in _DEFAULT_DOMAINS or len(node.outputs) != 1:
        return None
    attr = node.attributes.get("value")
    if attr is None or attr.type != ir.AttributeType.TENSOR or len(node.attributes) != 1:
        return None
    return attr.as_tensor()


def _auxiliary(value: ir.Value | None) -> np.ndarray | None:
    """A step's constant operand (scale, zero point, shape) as an array, or None.

    Besides initializers and ``Constant`` nodes of any attribute (``value_ints``, ...), a
    ``Concat`` of such constants counts: torch's dynamo exporter writes reshape targets so.
    """
    if value is None or value.is_graph_input():
        return None
    tensor = constant_tensor(value)
    if tensor is None and value.producer() is not None and value.producer().op_type == "Constant":
        try:
            tensor = ir.convenience.get_const_tensor(value)
        except ValueError:
            tensor = None
    if tensor is not None:
        return _numpy(tensor, value.name)
    node = value.producer()
    if node is None or node.op_type != "Concat" or node.domain not in _DEFAULT_DOMAINS:
        return None
    parts = [_auxiliary(v) for v in node.inputs]
    if any(p is None or p.ndim != 1 for p in parts):
        return None
    return np.concatenate(parts)


def _numpy(tensor: ir.TensorProtocol, name: str) -> np.ndarray:
    try:
        return tensor.numpy()
    except Exception as e:  # noqa: BLE001 - the checker lets some inconsistent tensors through
        raise InvalidModelError(f"tensor {name!r} cannot be decoded ({type(e).__name__}: {e})") from e


def _stored_array(stored: ir.Value):
    """An in-memory array, or a ``WeightSlice`` for external data a worker can map itself."""
    tensor = constant_tensor(stored, allow_input=True)
    if isinstance(tensor, ir.ExternalTensor) and tensor.dtype not in _PACKED and tensor.dtype != ir.DataType.STRING:
        dtype = np.dtype(tensor.dtype.numpy()).newbyteorder("<")
        return WeightSlice(str(tensor.path), int(tensor.offset or 0), dtype.str, tuple(int(d) for d in tensor.shape))
    return _numpy(tensor, stored.name)


def _numpy_dtype(dtype: ir.DataType) -> np.dtype | None:
    try:
        return np.dtype(dtype.numpy())
    except Exception:  # noqa: BLE001 - types numpy cannot hold (strings, undefined)
        return None


def _root(value: ir.Value) -> WeightSource | None:
    tensor = constant_tensor(value, allow_input=True)
    if tensor is None:
        return None
    dtype = _numpy_dtype(tensor.dtype)
    if dtype is None:
        return None
    kind = "initializer" if value.is_initializer() else "constant"
    if tensor.dtype != ir.DataType.FLOAT:
        kind += f" {tensor.dtype.name.lower()}"
    shape = tuple(int(d) for d in tensor.shape)
    return WeightSource(value, value, (), (), kind, shape, dtype)


def find_source(value: ir.Value | None, depth: int = 0) -> WeightSource | None:
    """The ``WeightSource`` computing ``value``, or None when it is not constant."""
    if value is None or depth > MAX_STEPS:
        return None
    root = _root(value)
    if root is not None:
        return root
    node = value.producer()
    if node is None or node.domain not in _DEFAULT_DOMAINS or len(node.outputs) != 1:
        return None
    step = _STEPS.get(node.op_type)
    return None if step is None else step(node, depth)


def _extend(inner: WeightSource, node: ir.Node, step, kind: str, shape, dtype) -> WeightSource:
    steps = inner.steps + ((step,) if step is not None else ())
    return WeightSource(node.outputs[0], inner.stored, inner.nodes + (node,), steps, kind, tuple(shape), np.dtype(dtype))


def _identity(node: ir.Node, depth: int) -> WeightSource | None:
    inner = find_source(node.inputs[0] if node.inputs else None, depth + 1)
    if inner is None:
        return None
    return _extend(inner, node, None, f"identity({inner.kind})", inner.shape, inner.dtype)


def _cast(node: ir.Node, depth: int) -> WeightSource | None:
    inner = find_source(node.inputs[0] if node.inputs else None, depth + 1)
    to = node.attributes.get_int("to")
    dtype = _numpy_dtype(ir.DataType(to)) if to is not None else None
    if inner is None or dtype is None or dtype.kind not in "fiub":
        return None
    return _extend(inner, node, Cast(dtype.str), f"cast({inner.kind})", inner.shape, dtype)


def _transpose(node: ir.Node, depth: int) -> WeightSource | None:
    inner = find_source(node.inputs[0] if node.inputs else None, depth + 1)
    if inner is None:
        return None
    rank = len(inner.shape)
    perm = node.attributes.get_ints("perm")
    perm = tuple(int(p) for p in perm) if perm is not None else tuple(reversed(range(rank)))
    if sorted(perm) != list(range(rank)):
        return None
    shape = tuple(inner.shape[p] for p in perm)
    return _extend(inner, node, Transpose(perm), f"transpose({inner.kind})", shape, inner.dtype)


def _reshape(node: ir.Node, depth: int) -> WeightSource | None:
    if len(node.inputs) < 2:
        return None
    inner = find_source(node.inputs[0], depth + 1)
    target = _auxiliary(node.inputs[1])
    if inner is None or target is None:
        return None
    shape = _resolve_shape(inner.shape, target, bool(node.attributes.get_int("allowzero", 0)))
    if shape is None:
        return None
    return _extend(inner, node, Reshape(shape), f"reshape({inner.kind})", shape, inner.dtype)


def _resolve_shape(shape: tuple, target: np.ndarray, allowzero: bool) -> tuple | None:
    """Reshape's output shape (0 copies the input dimension unless ``allowzero``), or None."""
    if target.ndim != 1 or target.dtype.kind not in "iu":
        return None
    dims = [int(d) for d in target]
    for i, d in enumerate(dims):
        if d == 0 and not allowzero:
            if i >= len(shape):
                return None
            dims[i] = shape[i]
    size = int(np.prod(shape, dtype=np.int64))
    if dims.count(-1) == 1:
        known = int(np.prod([d for d in dims if d != -1], dtype=np.int64))
        if known == 0 or size % known:
            return None
        dims[dims.index(-1)] = size // known
    if any(d < 0 for d in dims) or int(np.prod(dims, dtype=np.int64)) != size:
        return None
    return tuple(dims)


def _dequantize(node: ir.Node, depth: int) -> WeightSource | None:
    if len(node.inputs) < 2:
        return None
    inner = find_source(node.inputs[0], depth + 1)
    scale = constant_tensor(node.inputs[1])
    zero = constant_tensor(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if inner is None or scale is None or (len(node.inputs) > 2 and node.inputs[2] is not None and zero is None):
        return None
    stored_type = constant_tensor(inner.stored, allow_input=True).dtype
    if inner.nodes or stored_type not in _QUANTIZED or inner.is_graph_input:
        return None  # quantized values straight from the stored tensor
    scale_array = _numpy(scale, node.inputs[1].name)
    out = node.attributes.get_int("output_dtype", 0)
    dtype = _numpy_dtype(ir.DataType(out)) if out else scale_array.dtype
    if dtype is None or dtype.kind != "f":
        return None
    axis = node.attributes.get_int("axis", 1)
    block = node.attributes.get_int("block_size", 0)
    rank = len(inner.shape)
    if rank and not -rank <= axis < rank:
        return None
    mode = _dequantize_mode(scale_array, inner.shape, axis, block)
    if mode is None:
        return None
    zero_array = _numpy(zero, node.inputs[2].name) if zero is not None else None
    step = Dequantize(scale_array, zero_array, axis, block, dtype.str)
    name = stored_type.name.lower()
    return _extend(inner, node, step, f"dequantize {name} {mode}", inner.shape, dtype)


def _dequantize_mode(scale: np.ndarray, shape: tuple, axis: int, block: int) -> str | None:
    """``per-tensor``, ``per-axis`` or ``blocked`` when ``scale`` fits ``shape``, else None."""
    if block:
        if scale.ndim != len(shape) or block < 1:
            return None
        axis %= len(shape)
        expected = [(d + block - 1) // block if i == axis else d for i, d in enumerate(shape)]
        return "blocked" if list(scale.shape) == expected else None
    if scale.size == 1 and scale.ndim <= 1:
        return "per-tensor"
    if scale.ndim == 1 and shape and scale.shape[0] == shape[axis % len(shape)]:
        return "per-axis"
    return None


def _mul(node: ir.Node, depth: int) -> WeightSource | None:
    """``Mul(source, constant factor)`` in either order; the factor must not widen the source."""
    if len(node.inputs) != 2:
        return None
    for data, other in ((0, 1), (1, 0)):
        factor = constant_tensor(node.inputs[other])
        inner = find_source(node.inputs[data], depth + 1) if factor is not None else None
        if inner is None:
            continue
        values = _numpy(factor, node.inputs[other].name)
        if values.dtype != inner.dtype or values.ndim > len(inner.shape) or values.size > int(np.prod(inner.shape)):
            continue
        try:
            if np.broadcast_shapes(values.shape, inner.shape) != tuple(inner.shape):
                continue
        except ValueError:
            continue
        return _extend(inner, node, Scale(values), f"scale({inner.kind})", inner.shape, inner.dtype)
    return None


_STEPS = {
    "Identity": _identity,
    "Cast": _cast,
    "Transpose": _transpose,
    "Reshape": _reshape,
    "DequantizeLinear": _dequantize,
    "Mul": _mul,
}
