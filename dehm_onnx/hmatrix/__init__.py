"""Pure numerics of dehm_onnx: hierarchical-matrix compression with a certified error.

This package depends on numpy and scipy only; it never imports onnx or onnxruntime
(a test imports it with onnx blocked). It takes and returns ndarrays and small frozen
dataclasses, and every result carries its certified error bound
``||W - W_H||_F <= certified_error <= tol * ||W||_F``.
"""

from .build import compress
from .hmatrix import Block, BlockKind, HMatrix
from .pack import PackedHMatrix, pack, unpack, validate_packed

__all__ = [
    "compress",
    "Block",
    "BlockKind",
    "HMatrix",
    "PackedHMatrix",
    "pack",
    "unpack",
    "validate_packed",
]
