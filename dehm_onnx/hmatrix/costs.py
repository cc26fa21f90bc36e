"""What each storage choice costs in bytes and (estimated) squared error, for the planner.

A *format* is a storage with its group size (``Format(Storage.INT4, 32)``; group 0 for the
float storages). ``formats_for(precision, dtype, group)`` lists the formats a call may use:
``precision`` names the cheapest storage allowed,

=========  ===============================================
``float``  the weight's dtype only (the engine's behaviour before storage choices existed)
``fp16``   float, float16
``int8``   float, float16, int8
``int4``   float, float16, int8, int4
``auto``   every storage (today the same set as ``int4``)
=========  ===============================================

and ``group`` is one of ``GROUP_SIZES`` or ``"auto"`` (each integer array picks its own).

Bytes are exact (``storage.py``). Errors here are *planning estimates* only; the certified
error is always measured on the stored arrays:

- a low-rank factor: singular vector ``j`` of a block, stored in format ``f``, is modelled to
  add ``rho_f * sigma_j^2`` of squared error per factor, where ``rho_f`` is the relative squared
  error of ``f`` on Gaussian data (``_RHO``, measured with ``storage.quantize_groupwise``);
- a dense block: the squared error of quantizing the weight itself, measured once per format on
  a grid of groups anchored at row 0, over every column of a matrix of at most
  ``_DENSE_SAMPLE`` entries and over evenly spaced columns of a larger one, and summed over the
  block's range (a block not aligned with the grid gets a proportional share).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .storage import GROUP_SIZES, Storage, group_count, store

__all__ = ["Format", "PRECISIONS", "formats_for", "CostModel", "DenseErrorTable"]

PRECISIONS = ("float", "fp16", "int8", "int4", "auto")
_ALLOWED = {
    "float": (Storage.FLOAT,),
    "fp16": (Storage.FLOAT, Storage.FP16),
    "int8": (Storage.FLOAT, Storage.FP16, Storage.INT8),
    "int4": (Storage.FLOAT, Storage.FP16, Storage.INT8, Storage.INT4),
    "auto": (Storage.FLOAT, Storage.FP16, Storage.INT8, Storage.INT4),
}
# Relative squared error of each integer format on Gaussian data (1M samples, float32 scales).
_RHO = {
    (Storage.INT8, 16): 2.2e-5, (Storage.INT8, 32): 2.9e-5, (Storage.INT8, 64): 3.5e-5, (Storage.INT8, 128): 4.2e-5,
    (Storage.INT4, 16): 5.8e-3, (Storage.INT4, 32): 7.5e-3, (Storage.INT4, 64): 9.1e-3, (Storage.INT4, 128): 1.03e-2,
}
_UNIT_ROUNDOFF = {np.dtype(np.float16): 2.0**-11, np.dtype(np.float32): 2.0**-24, np.dtype(np.float64): 2.0**-53}
_DENSE_SAMPLE = 2**18


@dataclass(frozen=True)
class Format:
    """A storage and, for the integer storages, its group size."""

    storage: Storage
    group: int = 0

    @property
    def label(self) -> str:
        return f"{self.storage.label}/g{self.group}" if self.group else self.storage.label


def formats_for(precision: str, dtype, group="auto") -> list[Format]:
    """The formats a compression at ``precision`` may use for a weight of ``dtype``.

    Raises:
        ConfigError: unknown precision or group.
    """
    if precision not in _ALLOWED:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if group == "auto":
        groups = GROUP_SIZES
    elif isinstance(group, (int, np.integer)) and not isinstance(group, bool) and int(group) in GROUP_SIZES:
        groups = (int(group),)
    else:
        raise ConfigError(f"group must be 'auto' or one of {GROUP_SIZES}, got {group!r}")
    out = []
    for storage in _ALLOWED[precision]:
        if storage == Storage.FP16 and np.dtype(dtype) == np.float16:
            continue  # float16 is the weight's own dtype
        if storage.is_int:
            out += [Format(storage, g) for g in groups]
        else:
            out.append(Format(storage))
    return out


class CostModel:
    """Bytes and planning error estimates of every format for one weight.

    Args:
        formats: the allowed formats (``formats_for``).
        dtype: the weight's dtype; ``scale_dtype``: the dtype of the scales.
        block_overhead: bytes counted per layout row.
    """

    def __init__(self, formats: list[Format], dtype, scale_dtype, block_overhead: int):
        self.formats = formats
        self.dtype = np.dtype(dtype)
        self.scale_dtype = np.dtype(scale_dtype)
        self.overhead = float(block_overhead)
        self.bits = np.array([self._bits(f) for f in formats], dtype=np.float64)
        self.groups = np.array([f.group for f in formats], dtype=np.int64)
        self.is_int = np.array([f.storage.is_int for f in formats])
        self.rho = np.array([self._rho(f) for f in formats], dtype=np.float64)
        self.float_only = len(formats) == 1

    def without_overhead(self) -> "CostModel":
        """The same model with no bytes per layout row."""
        return CostModel(self.formats, self.dtype, self.scale_dtype, 0)

    def _bits(self, f: Format) -> float:
        return {Storage.FLOAT: 8.0 * self.dtype.itemsize, Storage.FP16: 16.0, Storage.INT8: 8.0, Storage.INT4: 4.0}[f.storage]

    def _rho(self, f: Format) -> float:
        if f.storage.is_int:
            return _RHO[(f.storage, f.group)]
        target = self.dtype if f.storage == Storage.FLOAT else np.dtype(np.float16)
        return _UNIT_ROUNDOFF[target] ** 2 / 3.0

    def column_bytes(self, rows: np.ndarray) -> np.ndarray:
        """``(blocks, F)`` bytes of one column of ``rows`` values (a column of ``U``), scales included."""
        rows = np.asarray(rows, dtype=np.float64)[:, None]
        scales = np.where(self.is_int, np.ceil(rows / np.maximum(self.groups, 1)) * self.scale_dtype.itemsize, 0.0)
        return rows * self.bits / 8.0 + scales

    def row_bytes(self, cols: np.ndarray, rank: np.ndarray | float) -> np.ndarray:
        """``(blocks, F)`` bytes of one row of ``Vt`` (``cols`` values), its scales spread over ``rank`` rows.

        A ``Vt`` stored in integers has ``ceil(k / group) * cols`` scales for ``k`` rows, so one row
        costs ``cols * scale_bytes / min(group, k)`` on average.
        """
        cols = np.asarray(cols, dtype=np.float64)[:, None]
        rank = np.broadcast_to(np.asarray(rank, dtype=np.float64), cols.shape[:1])[:, None]
        spread = np.minimum(np.maximum(self.groups, 1), np.maximum(rank, 1.0))
        scales = np.where(self.is_int, cols * self.scale_dtype.itemsize / spread, 0.0)
        return cols * self.bits / 8.0 + scales

    def dense_bytes(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``(blocks, F)`` exact bytes of dense blocks (payload + scales, no layout)."""
        rows = np.asarray(rows, dtype=np.float64)[:, None]
        cols = np.asarray(cols, dtype=np.float64)[:, None]
        payload = np.ceil(rows * cols * self.bits / 8.0)
        scales = np.where(self.is_int, np.ceil(rows / np.maximum(self.groups, 1)) * cols * self.scale_dtype.itemsize, 0.0)
        return payload + scales


class DenseErrorTable:
    """Estimated squared error of storing any block of ``w`` dense, in each format.

    Built once per weight (``w`` float64, in the order the blocks index): for each format, the
    error of every (group of rows anchored at row 0, sampled column) pair.
    """

    def __init__(self, w: np.ndarray, model: CostModel):
        m, n = w.shape
        self.m, self.n = m, n
        stride = max(1, -(-m * n // _DENSE_SAMPLE))
        self.cols = np.arange(min(stride // 2, n - 1), n, stride)
        sample = w[:, self.cols]
        self.tables = []  # per format: (granule rows, prefix sums (groups+1, samples+1))
        for f in model.formats:
            self.tables.append(self._table(sample, f, model))

    @staticmethod
    def _table(sample: np.ndarray, f: Format, model: CostModel):
        if f.storage == Storage.FLOAT:
            return None  # exact
        granule = f.group or 16
        stored = store(sample, f.storage, dtype=model.dtype, group=f.group, scale_dtype=model.scale_dtype)
        if stored is None:
            return "infeasible"
        diff = sample - stored.dequantized().astype(np.float64)
        groups = group_count(sample.shape[0], granule)
        padded = np.zeros((groups * granule, sample.shape[1]))
        padded[: sample.shape[0]] = diff * diff
        per_group = padded.reshape(groups, granule, -1).sum(axis=1)
        prefix = np.zeros((groups + 1, per_group.shape[1] + 1))
        prefix[1:, 1:] = per_group.cumsum(axis=0).cumsum(axis=1)
        return granule, prefix

    def errors(self, r0, r1, c0, c1) -> np.ndarray:
        """``(blocks, F)`` estimated squared errors of the blocks ``[r0, r1) x [c0, c1)``."""
        r0, r1, c0, c1 = (np.asarray(a, dtype=np.int64) for a in (r0, r1, c0, c1))
        lo = np.searchsorted(self.cols, c0)
        hi = np.searchsorted(self.cols, c1)
        count = hi - lo
        # A block between two sampled columns borrows the nearest one.
        empty = count == 0
        lo = np.where(empty, np.minimum(lo, len(self.cols) - 1), lo)
        hi = np.where(empty, lo + 1, hi)
        scale = (c1 - c0) / np.maximum(hi - lo, 1)
        out = np.zeros((len(r0), len(self.tables)))
        for i, table in enumerate(self.tables):
            if table is None:
                continue
            if isinstance(table, str):
                out[:, i] = np.inf
                continue
            granule, prefix = table
            total = self._rows_prefix(prefix, r1 / granule, lo, hi) - self._rows_prefix(prefix, r0 / granule, lo, hi)
            out[:, i] = np.maximum(total, 0.0) * scale
        return out

    @staticmethod
    def _rows_prefix(prefix: np.ndarray, x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Prefix sum over rows up to fractional group ``x``, over sampled columns ``[lo, hi)``."""
        groups = prefix.shape[0] - 1
        x = np.clip(x, 0.0, groups)
        whole = np.minimum(np.floor(x).astype(np.int64), groups)
        frac = x - whole
        nxt = np.minimum(whole + 1, groups)
        base = prefix[whole, hi] - prefix[whole, lo]
        step = (prefix[nxt, hi] - prefix[nxt, lo]) - base
        return base + frac * step
