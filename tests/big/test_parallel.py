"""dehm_onnx.compression.parallel: worker processes, task order, automatic job count, BLAS threads."""

from __future__ import annotations

import os

import numpy as np
import pytest

from dehm_onnx.compression import parallel
from dehm_onnx.errors import CompressionError
from dehm_onnx.hmatrix import pack
from dehm_onnx.compression.parallel import LayerTask, compress_layers
from dehm_onnx.compression.weights import WeightSlice
from tests.conftest import low_rank, smooth_kernel


def _report_pid(w, tol, *, seed=0):
    raise CompressionError(f"pid={os.getpid()}")


def _pids(results) -> set[str]:
    return {r.skip.sentence.rsplit("pid=", 1)[1] for r in results}


def _tasks(rng, count=4, n=64):
    return [LayerTask(f"w{i}", low_rank(rng, n, n + 8 * i), i % 2 == 1, 1e-3, 0) for i in range(count)]


def test_jobs_above_one_compress_in_worker_processes(rng, monkeypatch):
    monkeypatch.setattr(parallel, "compress", _report_pid)  # forked workers inherit the patch
    pids = _pids(compress_layers(_tasks(rng), jobs=2))
    assert str(os.getpid()) not in pids and 1 <= len(pids) <= 2


@pytest.mark.parametrize("jobs", [1, 0])
def test_one_job_and_small_automatic_work_stay_in_process(rng, monkeypatch, jobs):
    monkeypatch.setattr(parallel, "compress", _report_pid)
    assert _pids(compress_layers(_tasks(rng), jobs=jobs)) == {str(os.getpid())}


def test_results_come_back_in_task_order_and_equal_for_any_jobs(rng):
    tasks = _tasks(rng, count=5)
    tasks.append(LayerTask("kernel", smooth_kernel(160, 96), False, 1e-4, 3))
    runs = [compress_layers(tasks, jobs=jobs) for jobs in (1, 2, 3)]
    for results in runs:
        assert [r.hm.shape for r in results] == [t.source.T.shape if t.transpose else t.source.shape for t in tasks]
    packed = [[pack(r.hm).data.tobytes() for r in results] for results in runs]
    assert packed[0] == packed[1] == packed[2]


def test_memory_mapped_source_gives_the_same_result_as_the_array(tmp_path, rng):
    w = low_rank(rng, 96, 80)
    path = tmp_path / "w.bin"
    path.write_bytes(b"\0" * 16 + w.tobytes())
    mapped = LayerTask("w", WeightSlice(str(path), 16, "<f4", (96, 80)), False, 1e-3, 0)
    in_memory = LayerTask("w", w, False, 1e-3, 0)
    a, b = compress_layers([mapped, in_memory], jobs=1)
    assert pack(a.hm).data.tobytes() == pack(b.hm).data.tobytes()


def test_single_blas_thread_is_restored_afterwards():
    libraries = parallel._openblas_libraries()  # noqa: SLF001
    before = [getter() for getter, _ in libraries]
    with parallel.single_blas_thread():
        assert all(getter() == 1 for getter, _ in libraries)
    assert [getter() for getter, _ in libraries] == before


def test_a_dead_worker_is_a_compression_error(rng, monkeypatch):
    def die(w, tol, *, seed=0):
        os._exit(3)

    monkeypatch.setattr(parallel, "compress", die)
    with pytest.raises(CompressionError, match="worker process died"):
        compress_layers(_tasks(rng), jobs=2)


def test_non_finite_values_are_counted_in_chunks(monkeypatch):
    monkeypatch.setattr(parallel, "_FINITE_CHUNK", 64)
    w = np.ones((40, 8), np.float32)
    w[[0, 17, 39], [1, 2, 3]] = [np.nan, np.inf, -np.inf]
    result = parallel.run_task(LayerTask("w", w, False, 1e-3, 0))
    assert result.hm is None and "3 NaN/Inf" in result.skip.sentence
