"""The ``HMatMul`` operator: its contract, a Python reference and node builders.

This module is the single statement of the op's contract. Emitters, the C++ kernels
(``custom_ops/include/dehm/layout.h``) and the docs cite it.

Contract (domain ``ai.dehm``, version 1)::

    Y = HMatMul(X, data, layout, row_perm, col_perm)        # Y = X @ W_H

Inputs, all required, in this order:

``X``
    tensor of shape ``(..., m)`` (any rank >= 1, leading dimensions may be 0).
``data``, ``layout``, ``row_perm``, ``col_perm``
    the packed H-matrix, exactly as defined in ``dehm_onnx/hmatrix/pack.py`` (layout
    version 1 or 2, told apart by the type of ``data``, see Types; read its module
    docstring). ``m = max(layout[:, ROW1])``
    must equal the last dimension of ``X``; ``n = max(layout[:, COL1])``.

Output:

``Y``
    tensor of shape ``(..., n)``: ``X``'s leading dimensions followed by ``n``.

Types: ``X`` and ``Y`` share one type ``T`` in {float32, float16}; ``layout``, ``row_perm``,
``col_perm`` are int64. ``data`` selects the layout version (``pack.py``):

- ``data`` of type ``T``: layout version 1 (``layout`` has 7 columns), every payload in ``T``;
- ``data`` of type uint8: layout version 2 (``layout`` has 8 columns), every stored array
  kept as float32, float16, int8 or int4 with groupwise scales. This is the same op (type,
  domain, version, inputs); onnxruntime picks the kernel by the type of ``data`` (the library
  registers one kernel per ``(T, data type)`` pair, the custom-op API's way of giving an input
  several types). Files written before version 2 existed are unchanged and run as before.

The kernels accumulate in float32 and round once when writing ``Y`` (float16). A version-2
array is dequantized to exactly the values ``pack.unpack`` gives (``fl(q * scale)`` rounded
once to the scale's type) before it is multiplied, tile by tile: no dense copy of the weight.
On the CUDA execution provider only version 1 has a kernel; a version-2 node has no CUDA
kernel, so onnxruntime assigns it to the CPU kernel (``docs/custom_op.md``).

No attributes. A malformed packed H-matrix (see ``pack.validate_packed``) is an error:
the kernels return an onnxruntime error naming the problem and never read out of bounds.
"""

from __future__ import annotations

import numpy as np

from ..hmatrix.pack import PackedHMatrix, unpack

__all__ = [
    "DOMAIN",
    "OP_TYPE",
    "VERSION",
    "INPUTS",
    "OUTPUTS",
    "SUPPORTED_DTYPES",
    "hmatmul_reference",
    "HMatMul",
    "opset_import",
    "make_hmatmul_node",
    "packed_initializers",
    "make_hmatmul_model",
]

DOMAIN = "ai.dehm"
OP_TYPE = "HMatMul"
VERSION = 1
INPUTS = ("X", "data", "layout", "row_perm", "col_perm")
OUTPUTS = ("Y",)
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


def hmatmul_reference(x, data, layout, row_perm, col_perm) -> np.ndarray:
    """Compute ``Y = X @ W_H`` from the op's inputs with numpy (float64 inside).

    Raises:
        ValueError: a malformed packed H-matrix, mismatched dtypes or shapes.
    """
    x, data = np.asarray(x), np.asarray(data)
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"HMatMul: X must be float32 or float16, got {x.dtype}")
    if data.dtype != x.dtype and data.dtype != np.uint8:
        raise ValueError(f"HMatMul: data dtype {data.dtype} differs from X dtype {x.dtype} (and is not uint8, layout v2)")
    layout = np.asarray(layout, dtype=np.int64)
    packed = PackedHMatrix(data, layout, np.asarray(row_perm, np.int64), np.asarray(col_perm, np.int64), (0, 0))
    hm = unpack(packed)
    return hm.matmul(x).astype(x.dtype, copy=False)


def _make_op_run_class():
    from onnx.reference.op_run import OpRun

    class HMatMul(OpRun):
        """``onnx.reference`` implementation: ``ReferenceEvaluator(model, new_ops=[HMatMul])``."""

        op_domain = DOMAIN

        def _run(self, X, data, layout, row_perm, col_perm):
            return (hmatmul_reference(X, data, layout, row_perm, col_perm),)

    return HMatMul


def __getattr__(name):
    # onnx.reference is imported only when the OpRun class is asked for.
    if name == "HMatMul":
        cls = _make_op_run_class()
        globals()["HMatMul"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def opset_import():
    """The ``OperatorSetIdProto`` a model needs to use ``HMatMul``."""
    from onnx import helper

    return helper.make_opsetid(DOMAIN, VERSION)


def make_hmatmul_node(x: str, packed_names, y: str, *, name: str = "", overload: str = ""):
    """Build one ``HMatMul`` node.

    Args:
        x: name of the input tensor ``X``.
        packed_names: names of ``(data, layout, row_perm, col_perm)``, in that order.
        y: name of the output tensor.
        name: node name.
        overload: ``node.overload`` (selects a model-local function body, see emit_function).
    """
    from onnx import helper

    packed_names = tuple(packed_names)
    if len(packed_names) != 4:
        raise ValueError(f"HMatMul needs 4 packed inputs (data, layout, row_perm, col_perm), got {len(packed_names)}")
    node = helper.make_node(OP_TYPE, [x, *packed_names], [y], name=name, domain=DOMAIN)
    if overload:
        node.overload = overload
    return node


def packed_initializers(packed: PackedHMatrix, prefix: str, dtype=None):
    """The four initializers of a packed H-matrix, named ``<prefix>.data`` etc.

    Args:
        packed: the packed arrays.
        prefix: name prefix.
        dtype: stored dtype of ``data`` (default: ``packed.data.dtype``).

    Returns:
        a list of four ``TensorProto`` in input order ``(data, layout, row_perm, col_perm)``;
        a layout-v2 ``data`` stays uint8 whatever ``dtype`` says.
    """
    from onnx import numpy_helper

    data = packed.data if dtype is None or packed.version == 2 else packed.data.astype(dtype)
    arrays = (data, packed.layout, packed.row_perm, packed.col_perm)
    return [numpy_helper.from_array(np.ascontiguousarray(a), f"{prefix}.{field}") for a, field in zip(arrays, INPUTS[1:])]


_ONNX_FLOAT_TYPES = {np.dtype(np.float32): 1, np.dtype(np.float16): 10}  # TensorProto.FLOAT, FLOAT16


def make_hmatmul_model(packed: PackedHMatrix, *, x_rank: int = 2, dtype=None, packed_as_inputs: bool = False):
    """A one-node model ``Y = HMatMul(X, ...)`` (IR 10, opset 18 + ``ai.dehm`` 1).

    Args:
        packed: the packed H-matrix.
        x_rank: rank of ``X``; every leading dimension is symbolic.
        dtype: float32 or float16 (default: ``packed.data.dtype``; float32 for layout v2).
        packed_as_inputs: make the four packed arrays graph inputs instead of initializers
            (then the last dimensions of ``X`` and ``Y`` are symbolic too).
    """
    from onnx import TensorProto, helper

    dtype = np.dtype(dtype or (np.float32 if packed.version == 2 else packed.data.dtype))
    if dtype not in _ONNX_FLOAT_TYPES:
        raise ValueError(f"HMatMul supports float32 and float16, got {dtype}")
    elem = _ONNX_FLOAT_TYPES[dtype]
    m, n = packed.shape
    lead = [f"d{i}" for i in range(x_rank - 1)]
    inputs = [helper.make_tensor_value_info("X", elem, [*lead, "m" if packed_as_inputs else m])]
    inits = packed_initializers(packed, "w", dtype=dtype)
    if packed_as_inputs:
        data_elem = TensorProto.UINT8 if packed.version == 2 else elem
        types = (data_elem, TensorProto.INT64, TensorProto.INT64, TensorProto.INT64)
        inputs += [helper.make_tensor_value_info(t.name, et, None) for t, et in zip(inits, types)]
        inits = []
    node = make_hmatmul_node("X", [f"w.{f}" for f in INPUTS[1:]], "Y", name="hmatmul")
    y_info = helper.make_tensor_value_info("Y", elem, [*lead, "n" if packed_as_inputs else n])
    graph = helper.make_graph([node], "hmatmul", inputs, [y_info], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), opset_import()], ir_version=10)
