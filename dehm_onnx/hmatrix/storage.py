"""How one stored array of an H-matrix is kept: in the weight's dtype, float16, int8 or int4.

Every array a block stores is the right operand of a product: a dense block ``D`` in
``X_b @ D``, a low-rank factor ``U`` in ``T = X_b @ U`` and ``Vt`` in ``T @ Vt``. Its rows
therefore run along the *contraction axis* ``K`` and its columns along the output axis ``N``
(for ``Vt`` the contraction axis is the rank). An array ``A`` of shape ``(K, N)`` is stored as
one of (``Storage``):

``FLOAT``
    the weight's own dtype (float16, float32 or float64), exactly as given;
``FP16``
    IEEE float16, rounded to nearest even (for a float16 weight this is ``FLOAT``);
``INT8``, ``INT4``
    symmetric integers (zero point 0): ``INT8`` in ``[-127, 127]``, ``INT4`` in ``[-8, 7]``
    (the full int4 range; the scale search below may map a group's extreme to -8), held in an
    ``int8`` array here and two to a byte in a file (``pack_int4``). One scale per *group* of
    ``group`` consecutive rows of each column: ``scales`` has shape ``(ceil(K / group), N)``,
    row ``g`` of it scales rows ``[g * group, min((g + 1) * group, K))`` (the last group may be
    partial). ``group`` is a power of two of at least 16 (``GROUP_SIZES``). The scales are kept
    in a *scale dtype*, by default the weight's dtype.

The value an integer array stands for is, entry by entry,

    ``A[i, j] = fl(q[i, j] * scales[i // group, j])``

with the product rounded once to the scale dtype. That is exactly what
``DequantizeLinear(q, scales, axis=0, block_size=group)`` (ONNX opset 21) computes, the form
onnxruntime rewrites together with the following ``MatMul`` into its ``MatMulNBits`` kernel when
the scale dtype is the activation dtype (float32 or float16). Every error the engine certifies
is measured on these dequantized values (``StoredArray.dequantized``).

Bytes (``StoredArray.nbytes``): the payload (``K*N`` items of the dtype; ``K*N`` bytes for
int8; ``ceil(K*N / 2)`` for int4, as an ONNX int4 tensor stores them) plus the scales
(``ceil(K / group) * N`` items of the scale dtype).

Choosing the scale: int8 uses ``amax / 127`` of each group (``amax`` its largest magnitude).
int4 tries ``c * amax / 7`` for the few ``c`` in ``INT4_CLIP`` (``c = 7/8`` maps the extreme to
``-8`` or clips it to 7; smaller ``c`` clip the extremes) and keeps, per group, the scale with
the least squared error of the dequantized values (on Gaussian data this lowers int4's error by
about 12 %; for int8 it gains nothing measurable, so int8 does not search).

Bad values never give a silently wrong array: a group whose scale rounds to 0 in the scale
dtype (all zeros, or so small that it underflows) stores zeros and its true error is what is
measured; a scale, a dequantized value or a float16 value that overflows to infinity makes the
storage unusable for that array (``store`` returns ``None``) and the engine keeps it in another
storage.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Storage",
    "GROUP_SIZES",
    "INT_RANGE",
    "INT4_CLIP",
    "StoredArray",
    "store",
    "quantize_groupwise",
    "dequantize_groupwise",
    "group_count",
    "payload_nbytes",
    "pack_int4",
    "unpack_int4",
]


class Storage(enum.IntEnum):
    """How an array is stored; the integer values are meant for the packed layout."""

    FLOAT = 0
    FP16 = 1
    INT8 = 2
    INT4 = 3

    @property
    def is_int(self) -> bool:
        return self in (Storage.INT8, Storage.INT4)

    @property
    def label(self) -> str:
        """Short lower-case name used in reports (``float``, ``fp16``, ``int8``, ``int4``)."""
        return self.name.lower()


GROUP_SIZES = (16, 32, 64, 128)
INT_RANGE = {Storage.INT8: (-127, 127), Storage.INT4: (-8, 7)}
INT4_CLIP = (1.0, 0.95, 0.9, 0.875, 0.85, 0.8, 0.75, 0.7)
_FLOAT_DTYPES = (np.float16, np.float32, np.float64)


def group_count(rows: int, group: int) -> int:
    """Number of scale groups along ``rows`` (the last one may be partial)."""
    return -(-rows // group)


def payload_nbytes(storage: Storage, size: int, itemsize: int) -> int:
    """Bytes of ``size`` stored values (``itemsize`` is the weight dtype's, used for FLOAT)."""
    if storage == Storage.FLOAT:
        return size * itemsize
    if storage == Storage.FP16:
        return 2 * size
    if storage == Storage.INT8:
        return size
    return (size + 1) // 2


@dataclass(frozen=True, eq=False)
class StoredArray:
    """One array as stored: ``values`` (and ``scales``/``group`` for integer storage).

    ``values`` is float (the weight's dtype) for FLOAT, float16 for FP16 and int8 (holding the
    integers) for INT8/INT4. ``scales`` is ``(ceil(K / group), N)`` in the scale dtype for the
    integer storages and ``None`` otherwise; ``group`` is 0 for the float storages.
    """

    storage: Storage
    values: np.ndarray
    scales: np.ndarray | None = None
    group: int = 0

    def __post_init__(self):
        values = self.values
        if values.ndim != 2:
            raise ValueError(f"stored arrays are 2-D, got shape {values.shape}")
        if self.storage.is_int:
            low, high = INT_RANGE[self.storage]
            if values.dtype != np.int8:
                raise ValueError(f"{self.storage.label} values must be int8, got {values.dtype}")
            if values.size and (int(values.min()) < low or int(values.max()) > high):
                raise ValueError(f"{self.storage.label} values outside [{low}, {high}]")
            if self.group not in GROUP_SIZES:
                raise ValueError(f"group must be one of {GROUP_SIZES}, got {self.group}")
            expected = (group_count(values.shape[0], self.group), values.shape[1])
            if self.scales is None or self.scales.shape != expected or self.scales.dtype.type not in _FLOAT_DTYPES:
                got = None if self.scales is None else (self.scales.shape, self.scales.dtype)
                raise ValueError(f"scales must be float of shape {expected}, got {got}")
        else:
            if self.scales is not None or self.group != 0:
                raise ValueError(f"{self.storage.label} storage has no scales or group")
            if values.dtype.type not in _FLOAT_DTYPES or (self.storage == Storage.FP16 and values.dtype != np.float16):
                raise ValueError(f"{self.storage.label} values cannot have dtype {values.dtype}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)

    @property
    def dtype(self) -> np.dtype:
        """dtype of the dequantized values: the scale dtype for integers, else the values'."""
        return self.scales.dtype if self.scales is not None else self.values.dtype

    @property
    def payload_nbytes(self) -> int:
        return payload_nbytes(self.storage, self.values.size, self.values.dtype.itemsize)

    @property
    def scale_nbytes(self) -> int:
        return 0 if self.scales is None else self.scales.nbytes

    @property
    def nbytes(self) -> int:
        """Payload plus scales."""
        return self.payload_nbytes + self.scale_nbytes

    def dequantized(self) -> np.ndarray:
        """The values this array stands for, in ``self.dtype`` (``DequantizeLinear`` semantics)."""
        if self.scales is None:
            return self.values
        return dequantize_groupwise(self.values, self.scales, self.group)

    @staticmethod
    def exact(values: np.ndarray) -> "StoredArray":
        """FLOAT storage of an array as it is (no rounding)."""
        return StoredArray(Storage.FLOAT, np.asarray(values))


def dequantize_groupwise(q: np.ndarray, scales: np.ndarray, group: int) -> np.ndarray:
    """``fl(q[i, j] * scales[i // group, j])`` in the scales' dtype (one rounding).

    The product of an integer of at most 8 bits and a float16 or float32 scale is exact in
    float32, and IEEE multiplication in the scale dtype rounds it once, so computing in the scale
    dtype is exactly ``DequantizeLinear``.
    """
    expanded = np.repeat(scales, group, axis=0)[: q.shape[0]]
    return q.astype(scales.dtype) * expanded


def _group_view(a: np.ndarray, group: int) -> np.ndarray:
    """``a`` (K, N) as (groups, group, N), zero-padded at the end."""
    rows, cols = a.shape
    groups = group_count(rows, group)
    if groups * group == rows:
        return a.reshape(groups, group, cols)
    padded = np.zeros((groups * group, cols), dtype=a.dtype)
    padded[:rows] = a
    return padded.reshape(groups, group, cols)


def _work_dtype(a: np.ndarray, scale_dtype: np.dtype) -> np.dtype:
    """float32 for the scale search when it holds the data and the scales, else float64.

    The search only picks integers; the error of what is stored is measured elsewhere, in
    float64, so float32 rounding here can at worst pick a marginally worse scale.
    """
    if scale_dtype == np.float64 or a.dtype == np.float64 and a.size and float(np.abs(a).max()) > 1e37:
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def quantize_groupwise(a: np.ndarray, storage: Storage, group: int, scale_dtype) -> tuple[np.ndarray, np.ndarray] | None:
    """Symmetric groupwise integers of ``a`` (K, N): ``(q int8 (K, N), scales (ceil(K/group), N))``.

    Returns ``None`` when a scale overflows the scale dtype (the array cannot be stored so).
    """
    if not storage.is_int:
        raise ValueError(f"not an integer storage: {storage!r}")
    scale_dtype = np.dtype(scale_dtype)
    a = np.asarray(a)
    rows, cols = a.shape
    low, high = INT_RANGE[storage]
    work = _work_dtype(a, scale_dtype)
    x = _group_view(a.astype(work, copy=False), group)
    amax = np.abs(x).max(axis=1).astype(np.float64) if x.size else np.zeros((x.shape[0], cols))
    candidates = INT4_CLIP if storage == Storage.INT4 else (1.0,)
    scales = best_err = None
    for c in candidates:
        with np.errstate(over="ignore"):
            trial = (amax * (c / high)).astype(scale_dtype)
        if not np.isfinite(trial).all():
            if c == 1.0:
                return None
            continue
        if len(candidates) == 1:
            scales = trial
            break
        q = _integers(x, trial, low, high, work)
        deq = (q * trial.astype(work)[:, None, :]).astype(scale_dtype).astype(work, copy=False)
        deq -= x
        err = np.einsum("gij,gij->gj", deq, deq)
        if best_err is None:
            scales, best_err = trial, err
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            scales = np.where(better, trial, scales)
    q = _integers(x, scales, low, high, work).reshape(x.shape[0] * x.shape[1], cols)[:rows].astype(np.int8)
    return q, scales.astype(scale_dtype)


def _integers(x: np.ndarray, scales: np.ndarray, low: int, high: int, work) -> np.ndarray:
    """``clip(rint(x / scale))`` per group; a zero scale (an all-zero group, or one that
    underflows) gives 0."""
    divisor = np.where(scales > 0, scales.astype(work), np.inf).astype(work)
    with np.errstate(over="ignore"):  # a subnormal scale: the quotient saturates and is clipped
        q = x / divisor[:, None, :]
    np.rint(q, out=q)
    return np.clip(q, low, high, out=q)


def store(a: np.ndarray, storage: Storage, *, dtype, group: int = 0, scale_dtype=None) -> StoredArray | None:
    """``a`` (float, any precision) stored as ``storage``; ``None`` when it cannot be.

    Args:
        a: the array in usage orientation (rows along the contraction axis).
        storage: how to store it.
        dtype: the weight's dtype (what FLOAT means).
        group: rows per scale group (integer storages only).
        scale_dtype: dtype of the scales (default ``dtype``).

    Returns:
        The stored array, or ``None`` when a value (float16) or a scale overflows.
    """
    dtype = np.dtype(dtype)
    if storage in (Storage.FLOAT, Storage.FP16):
        target = dtype if storage == Storage.FLOAT else np.dtype(np.float16)
        with np.errstate(over="ignore"):
            values = np.asarray(a).astype(target)
        if not np.isfinite(values).all():
            return None
        return StoredArray(Storage.FLOAT if target == dtype else Storage.FP16, values)
    result = quantize_groupwise(a, storage, group, np.dtype(scale_dtype or dtype))
    if result is None:
        return None
    stored = StoredArray(storage, result[0], result[1], group)
    with np.errstate(over="ignore"):
        finite = np.isfinite(stored.dequantized()).all()
    return stored if finite else None  # q * scale overflowed the scale dtype


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Flattened int4 values two to a byte, first in the low nibble (ONNX int4 order)."""
    flat = np.asarray(q, dtype=np.int8).ravel()
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ValueError("int4 values must lie in [-8, 7]")
    nibbles = (flat.astype(np.uint8) & 0x0F)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, size: int) -> np.ndarray:
    """Inverse of ``pack_int4``: the first ``size`` int4 values as int8."""
    packed = np.asarray(packed, dtype=np.uint8).ravel()
    if size > 2 * packed.size:
        raise ValueError(f"{packed.size} bytes hold at most {2 * packed.size} int4 values, asked for {size}")
    nibbles = np.empty(2 * packed.size, dtype=np.uint8)
    nibbles[0::2] = packed & 0x0F
    nibbles[1::2] = packed >> 4
    values = nibbles[:size].astype(np.int8)
    return np.where(values > 7, values - 16, values).astype(np.int8)
