"""Compress many weights, in worker processes when ``jobs > 1``.

Each ``LayerTask`` is self-contained: its weight is an in-memory array, a ``WeightSlice``
(a validated external-data file and offset, memory-mapped by whoever runs the task) or a
``WeightRecipe`` (one of those plus dequantize/cast/reshape steps), its ``tol`` and its
``seed``. The seed comes from the configuration, never from the task's
position, and results are returned in task order, so the output is the same for any
number of workers and any completion order. Workers are forked where the platform allows
it, and touch only numpy/scipy (``dehm_onnx.compression`` and ``dehm_onnx.hmatrix``).
The NaN/Inf check of a weight is made here, once, on the float weight being compressed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np

from ..errors import CompressionError, InvalidWeightError
from ..hmatrix import HMatrix, compress
from .skips import Skip, SkipReason, check_gain
from .weights import WeightRecipe, WeightSlice, open_weight

__all__ = ["LayerTask", "LayerResult", "available_cores", "resolve_jobs", "compress_layers"]

# Bytes of a weight checked for NaN/Inf at a time (bounds the temporary boolean array).
_FINITE_CHUNK = 1 << 24
# With jobs=0 (automatic), fewer weight elements than this are compressed in this process:
# starting workers would cost more than they save (results are the same either way).
AUTO_MIN_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class LayerTask:
    """One weight to compress: ``compress(W, tol, seed=seed, precision=..., block_overhead=...,
    scale_dtype=...)`` with ``W = source`` (or its transpose).

    ``stored_nbytes`` is what the weight takes in the model as stored (its tensor and the
    constants computing it); the compressed form must take fewer bytes (``check_gain``).
    """

    name: str
    source: np.ndarray | WeightSlice | WeightRecipe
    transpose: bool
    tol: float
    seed: int
    max_ratio: float = 1.0
    precision: str = "float"
    block_overhead: int = 64
    stored_nbytes: int | None = None
    scale_dtype: str | None = None


@dataclass(frozen=True)
class LayerResult:
    """The H-matrix, or the reason the layer stays dense (then ``hm`` is ``None``)."""

    hm: HMatrix | None
    skip: Skip | None
    dense_params: int


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_jobs(jobs: int) -> int:
    """``jobs`` worker processes, where 0 means one per available core."""
    return available_cores() if jobs == 0 else jobs


def _count_non_finite(w: np.ndarray) -> int:
    rows = max(1, _FINITE_CHUNK // max(1, w.shape[1] * w.itemsize)) if w.ndim == 2 else w.shape[0]
    return sum(int(np.count_nonzero(~np.isfinite(w[i : i + rows]))) for i in range(0, w.shape[0], rows))


def run_task(task: LayerTask) -> LayerResult:
    """Load the weight, check it is finite, compress it; a failure becomes a skip reason."""
    w = open_weight(task.source)
    try:
        dense = int(w.size)
        bad = _count_non_finite(w)
        if bad:
            return LayerResult(None, Skip.of(SkipReason.NON_FINITE, weight=task.name, count=bad), dense)
        matrix = w.T if task.transpose else w
        try:
            hm = compress(matrix, task.tol, seed=task.seed, precision=task.precision, block_overhead=task.block_overhead,
                          scale_dtype=task.scale_dtype)
        except (CompressionError, InvalidWeightError) as e:
            return LayerResult(None, Skip.of(SkipReason.COMPRESSION_FAILED, error=str(e)), dense)
        stored = task.stored_nbytes if task.stored_nbytes is not None else hm.dense_nbytes
        skip = check_gain(hm.nbytes, stored, task.tol, task.max_ratio)
        # A layer that stays dense is not sent back: its blocks can be as large as W.
        return LayerResult(None if skip else hm, skip, dense)
    finally:
        del w  # unmaps a memory-mapped weight: its pages stop counting as resident


def _openblas_libraries() -> list:
    """The OpenBLAS libraries loaded in this process (numpy's and scipy's), via ctypes."""
    libraries = []
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.rsplit("/", 1)[-1].lower()}
    except OSError:  # not Linux: leave BLAS threading alone
        return libraries
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                setter = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                getter = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                if setter is not None and getter is not None:
                    libraries.append((getter, setter))
    return libraries


@contextlib.contextmanager
def single_blas_thread():
    """Run BLAS on one thread inside the block.

    Every layer is computed with the same BLAS thread count, in this process or in a worker,
    so results do not depend on ``jobs``; parallelism comes from the worker processes
    (2 workers x 2 BLAS threads on 2 cores ran 2.4x slower than 1 process, measured).
    """
    libraries = _openblas_libraries()
    before = [getter() for getter, _ in libraries]
    for _, setter in libraries:
        setter(1)
    try:
        yield
    finally:
        for (_, setter), count in zip(libraries, before):
            setter(count)


def _init_worker() -> None:
    for _, setter in _openblas_libraries():
        setter(1)


def _elements(task: LayerTask) -> int:
    return int(np.prod(task.source.shape, dtype=np.int64))


def _context():
    # fork needs no re-import of the caller's __main__ (a script without a main guard
    # would otherwise start the optimization again in every worker).
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def compress_layers(
    tasks: Sequence[LayerTask],
    jobs: int = 1,
    on_done: Callable[[LayerTask, LayerResult], None] | None = None,
) -> list[LayerResult]:
    """Run every task; results in task order whatever ``jobs`` is.

    Args:
        tasks: the weights to compress.
        jobs: worker processes (0 = one per core, or this process for small work);
            1 runs in this process.
        on_done: called in this process as each task finishes (in completion order).

    Raises:
        CompressionError: a worker process died (e.g. killed for lack of memory).
    """
    if jobs == 0 and sum(_elements(t) for t in tasks) < AUTO_MIN_ELEMENTS:
        jobs = 1
    jobs = min(resolve_jobs(jobs), len(tasks))
    if jobs <= 1:
        results = []
        with single_blas_thread():
            for task in tasks:
                results.append(run_task(task))
                if on_done is not None:
                    on_done(task, results[-1])
        return results
    results: list[LayerResult | None] = [None] * len(tasks)
    context = _context()
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_init_worker) as pool:
        futures = {pool.submit(run_task, task): i for i, task in enumerate(tasks)}
        try:
            for future in concurrent.futures.as_completed(futures):
                i = futures[future]
                results[i] = future.result()
                if on_done is not None:
                    on_done(tasks[i], results[i])
        except BrokenProcessPool as e:
            raise CompressionError(
                f"a worker process died while compressing ({e}); try fewer --jobs (less memory)"
            ) from e
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return results  # type: ignore[return-value]
