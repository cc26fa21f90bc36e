"""dehm_onnx: compress constant MatMul/Gemm weights of ONNX models into error-bounded H-matrices.

The public API is imported lazily so that ``dehm_onnx.hmatrix`` (pure numpy/scipy) can be
used without onnx installed.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> module that defines it (imported on first use).
_LAZY = {
    "optimize": "dehm_onnx.api",
    "optimize_file": "dehm_onnx.api",
    "OptimizeConfig": "dehm_onnx.config",
    "Report": "dehm_onnx.report",
    "custom_op_library": "dehm_onnx.ops.library",
    "make_session": "dehm_onnx.ops.library",
    "verify": "dehm_onnx.verify",
    "compress": "dehm_onnx.hmatrix",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dehm_onnx' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
