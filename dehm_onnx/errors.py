"""Exception types shared by every layer of dehm_onnx.

This module imports nothing beyond the standard library, so the pure numerics in
``dehm_onnx.hmatrix`` can raise these without pulling in onnx.
"""

from __future__ import annotations

__all__ = [
    "DehmError",
    "ConfigError",
    "InvalidWeightError",
    "InvalidModelError",
    "CompressionError",
    "BoundViolation",
]


class DehmError(Exception):
    """Base class of every error raised on purpose by dehm_onnx."""


class ConfigError(DehmError, ValueError):
    """An argument or option is out of range or inconsistent."""


class InvalidWeightError(DehmError, ValueError):
    """A weight matrix cannot be compressed (wrong rank, dtype, non-finite values, empty)."""


class InvalidModelError(DehmError, ValueError):
    """A model file is missing, unreadable, not ONNX, or fails the ONNX checker."""


class CompressionError(DehmError):
    """The numerics failed (e.g. an SVD did not converge)."""


class BoundViolation(DehmError):
    """A measured error exceeds the bound the user allowed.

    Attributes:
        records: the offending layer records (objects with a ``name`` attribute).
    """

    def __init__(self, message: str, records=()):
        super().__init__(message)
        self.records = list(records)
