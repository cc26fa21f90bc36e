"""Pure numerics of dehm_onnx: hierarchical-matrix compression with a certified error.

This package depends on numpy and scipy only; it never imports onnx or onnxruntime
(a test imports it with onnx blocked). It takes and returns ndarrays and small frozen
dataclasses, and every result carries its certified error bound
``||W - W_H||_F <= certified_error <= tol * ||W||_F``, measured on the values the result
stands for (dequantized, where arrays are stored in float16 or integers).

Modules: ``build`` (``compress``: planning over the block tree), ``refine`` (storage and rank of
each leaf from exact errors), ``costs`` (formats, bytes and planning estimates), ``storage``
(one stored array: float, float16, int8 or int4 with groupwise scales, and the quantization
helpers emission reuses), ``hmatrix`` (the value types), ``pack`` (layout versions 1 and 2),
``lowrank``, ``cluster``.
"""

from .build import compress
from .hmatrix import Block, BlockKind, HMatrix
from .pack import PackedHMatrix, pack, unpack, validate_packed
from .storage import GROUP_SIZES, Storage, StoredArray, dequantize_groupwise, pack_int4, quantize_groupwise, store, unpack_int4

__all__ = [
    "compress",
    "Block",
    "BlockKind",
    "HMatrix",
    "PackedHMatrix",
    "pack",
    "unpack",
    "validate_packed",
    "GROUP_SIZES",
    "Storage",
    "StoredArray",
    "store",
    "quantize_groupwise",
    "dequantize_groupwise",
    "pack_int4",
    "unpack_int4",
]
