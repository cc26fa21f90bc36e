"""ONNX-aware part of dehm_onnx: find candidates, emit compressed layers, splice them in.

No linear algebra here beyond reshapes and transposes; the numerics live in
``dehm_onnx.hmatrix``.
"""
