"""Where a weight's values come from, in a form a worker process can open by itself.

A ``WeightSlice`` is a C-ordered array in an external-data file, memory-mapped when opened.
A ``WeightRecipe`` is a stored tensor (in memory or a ``WeightSlice``) plus the steps that
turn it into the float weight a MatMul/Gemm reads, in the order the graph applies them:

==============  ===========================================================================
step            computes (ONNX operator it stands for)
==============  ===========================================================================
``Dequantize``  ``(x - zero_point) * scale``, per tensor, per axis or blocked (DequantizeLinear)
``Cast``        ``x.astype(dtype)`` (Cast)
``Scale``       ``x * factor``, broadcast (Mul by a constant)
``Reshape``     ``x.reshape(shape)`` with the shape already resolved (Reshape)
``Transpose``   ``x.transpose(perm)`` (Transpose)
==============  ===========================================================================

Each step computes what onnxruntime computes, rounded once to the step's output dtype, so
the certified bound holds against the float weight the graph itself would compute. This
module imports numpy only: the slice it describes has been validated (inside the model's
folder, within the file's size) by ``dehm_onnx.model_io`` before a ``WeightSlice`` is made.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["WeightSlice", "Dequantize", "Cast", "Scale", "Reshape", "Transpose", "WeightRecipe", "open_weight"]


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


@dataclass(frozen=True)
class Dequantize:
    """``(x - zero_point) * scale`` as DequantizeLinear defines it.

    ``scale`` is a scalar (per tensor), 1-D along ``axis`` (per axis), or of ``x``'s rank
    with ``x.shape[axis] = ceil(.../block_size)`` entries along ``axis`` (blocked).
    """

    scale: np.ndarray
    zero_point: np.ndarray | None = None
    axis: int = 1
    block_size: int = 0
    dtype: str = ""

    def apply(self, x: np.ndarray) -> np.ndarray:
        scale, zero = self._broadcast(self.scale, x), None
        if self.zero_point is not None:
            zero = self._broadcast(np.asarray(self.zero_point).astype(np.int32), x)
        shifted = np.asarray(x).astype(np.int32)
        if zero is not None:
            shifted = shifted - zero
        # The difference and the float32/float16 scale multiply exactly in float64, so one
        # rounding to the output dtype gives what a float multiply in that dtype gives.
        out_dtype = np.dtype(self.dtype) if self.dtype else scale.dtype
        return (shifted.astype(np.float64) * scale.astype(np.float64)).astype(out_dtype)

    def _broadcast(self, values: np.ndarray, x: np.ndarray) -> np.ndarray:
        values = np.asarray(values)
        if values.ndim == 0 or values.size == 1 and not self.block_size:
            return values.reshape(())
        axis = self.axis % x.ndim
        if self.block_size:
            values = np.repeat(values, self.block_size, axis=axis)
            return np.take(values, np.arange(x.shape[axis]), axis=axis)
        shape = [1] * x.ndim
        shape[axis] = values.size
        return values.reshape(shape)


@dataclass(frozen=True)
class Cast:
    """``x.astype(dtype)``."""

    dtype: str

    def apply(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x).astype(self.dtype)


@dataclass(frozen=True)
class Scale:
    """``x * factor`` (broadcast), computed in ``x``'s dtype as Mul does."""

    factor: np.ndarray

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        return np.multiply(x, np.asarray(self.factor, dtype=x.dtype), dtype=x.dtype)


@dataclass(frozen=True)
class Reshape:
    """``x.reshape(shape)`` (``shape`` fully resolved: no 0 or -1 entries)."""

    shape: tuple[int, ...]

    def apply(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x).reshape(self.shape)


@dataclass(frozen=True)
class Transpose:
    """``x.transpose(perm)``."""

    perm: tuple[int, ...]

    def apply(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x).transpose(self.perm)


@dataclass(frozen=True)
class WeightRecipe:
    """A stored tensor and the steps that make it the float weight, ``shape`` after them."""

    stored: np.ndarray | WeightSlice
    steps: tuple = ()
    shape: tuple[int, ...] = ()

    def open(self) -> np.ndarray:
        """The float weight (a memory map when there is no step and the tensor is external)."""
        x = self.stored.open() if isinstance(self.stored, WeightSlice) else self.stored
        for step in self.steps:
            x = step.apply(x)
        return x


def open_weight(source) -> np.ndarray:
    """The array of an ndarray, a ``WeightSlice`` or a ``WeightRecipe``."""
    return source if isinstance(source, np.ndarray) else source.open()
