"""Weights that live in files: a memory-mapped slice of an external-data file.

This module imports numpy only (no onnx), so compression workers started by
``dehm_onnx.parallel`` can open a weight without loading the model. The slice it describes
has already been validated by ``dehm_onnx.graph.external`` (inside the model's folder, within
the file's size) before a ``WeightSlice`` is made.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["WeightSlice"]


@dataclass(frozen=True)
class WeightSlice:
    """A C-ordered array stored at ``offset`` in the file ``path``.

    Attributes:
        path: absolute path of the data file (validated to lie inside the model's folder).
        offset: byte offset of the first element.
        dtype: numpy dtype string, little-endian as ONNX stores it (e.g. ``"<f4"``).
        shape: array shape.
    """

    path: str
    offset: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Size of the array in bytes."""
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def open(self) -> np.ndarray:
        """The array, memory-mapped read-only (pages are read only when touched)."""
        if self.nbytes == 0:
            return np.zeros(self.shape, dtype=self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)
