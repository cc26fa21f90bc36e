"""Bytes and build time of compress(), beside the simple choices, on three kinds of weights.

Run by hand:
    python benchmarks/bench_hmatrix.py [--suite log gaussian filterbanks] [--sizes 1024 2048 4096 8192]
                                       [--oracle-max 2048] [--repeats 2]

Prints Markdown tables. Bytes are the engine's count (``HMatrix.nbytes``: payload + scales +
64 bytes per layout row + permutation indices) as a fraction of the dense weight in its dtype
(float32 here).

- ``log``: n x n 1-D log kernels, ``precision="float"`` and ``"auto"``: seconds, bytes,
  stored values, blocks, and ours / best simple choice in bytes (``tests/hmatrix/oracle.py``:
  dense in each uniform storage, global SVD with factors in each storage, fixed 2x2/4x4/8x8
  block low-rank and HODLR-64; exact SVDs, so only up to ``--oracle-max``). The fitted
  exponent of time against n is printed per tolerance and precision.
- ``gaussian``: a 1024 x 1024 standard normal weight (no structure) against the best uniform
  blockwise format (int8 or int4 in groups of 16..128 rows, float32 scales) meeting each tol.
- ``filterbanks``: the onnx-asr mel filterbanks (fetched by ``models/fetch.py``): bytes at
  tol 1e-3, and at the error that symmetric int4 in groups of 32 (onnxruntime's 4-bit
  MatMulNBits form) reaches on the same weight, beside that int4 form's bytes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dehm_onnx.hmatrix import compress  # noqa: E402
from dehm_onnx.hmatrix.storage import GROUP_SIZES, Storage, store  # noqa: E402
from tests.hmatrix.matrices import log_kernel_1d  # noqa: E402
from tests.hmatrix.oracle import oracle_bytes  # noqa: E402

OVERHEAD = 64


def _timed(w, tol, repeats, **kwargs):
    best, hm = np.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        hm = compress(w, tol, block_overhead=OVERHEAD, **kwargs)
        best = min(best, time.perf_counter() - start)
    return best, hm


def _rel_error(w, hm) -> float:
    w64 = w.astype(np.float64)
    return float(np.linalg.norm(w64 - hm.to_dense()) / np.linalg.norm(w64))


def log_suite(args) -> None:
    print("| n | tol | precision | seconds | bytes/dense | values/dense | blocks (zero/dense/low-rank) | max rank | ours / best simple choice, bytes (which) |")
    print("|---|---|---|---|---|---|---|---|---|")
    times = {}
    for n in args.sizes:
        w = log_kernel_1d(n, np.random.default_rng(0)).astype(np.float32)
        for tol in args.tols:
            oracle = {}
            for precision in ("float", "auto"):
                seconds, hm = _timed(w, tol, args.repeats, precision=precision)
                times.setdefault((tol, precision), []).append(seconds)
                c = hm.counts()
                versus = "—"
                if n <= args.oracle_max:
                    quantized = precision != "float"
                    if quantized not in oracle:
                        oracle[quantized] = oracle_bytes(w, tol, OVERHEAD, quantized=quantized)
                    which = min(oracle[quantized], key=oracle[quantized].get)
                    versus = f"{hm.nbytes / oracle[quantized][which]:.2f} ({which})"
                print(
                    f"| {n} | {tol:g} | {precision} | {seconds:.2f} | {hm.byte_ratio:.4f} | {hm.ratio:.4f} | "
                    f"{c['zero']}/{c['dense']}/{c['lowrank']} | {hm.max_rank} | {versus} |"
                )
    if len(args.sizes) > 1:
        print()
        for (tol, precision), ts in times.items():
            slope = np.polyfit(np.log(args.sizes), np.log(ts), 1)[0]
            print(f"tol {tol:g}, {precision}: time grows as n^{slope:.2f}")
    print()


def _uniform(w: np.ndarray, storage: Storage, group: int) -> tuple[float, float]:
    """(relative error, bytes / dense) of ``w`` stored whole in one integer format."""
    stored = store(w, storage, dtype=w.dtype, group=group)
    w64 = w.astype(np.float64)
    err = float(np.linalg.norm(w64 - stored.dequantized().astype(np.float64)) / np.linalg.norm(w64))
    return err, (stored.nbytes + OVERHEAD) / w.nbytes


def gaussian_suite(args) -> None:
    w = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    formats = {f"{s.label}/g{g}": _uniform(w, s, g) for s in (Storage.INT8, Storage.INT4) for g in GROUP_SIZES}
    print("Uniform formats on the 1024x1024 Gaussian weight (float32 scales): " + ", ".join(
        f"{name} error {e:.4f} bytes {b:.4f}" for name, (e, b) in formats.items()))
    print()
    print("| tol | best uniform format meeting tol (bytes) | ours: bytes/dense | error | seconds | blocks by storage |")
    print("|---|---|---|---|---|---|")
    for tol in (1e-2, 0.02, 0.05, 0.1):
        meeting = {k: b for k, (e, b) in formats.items() if e <= tol}
        best = min(meeting, key=meeting.get) if meeting else None
        seconds, hm = _timed(w, tol, 1, precision="auto")
        uniform = f"{best} ({meeting[best]:.4f})" if best else "none"
        print(f"| {tol:g} | {uniform} | {hm.byte_ratio:.4f} | {_rel_error(w, hm):.4f} | {seconds:.2f} | {hm.precision_counts()} |")
    print()


def filterbank_suite(args) -> None:
    from tests.hmatrix.filterbanks import FILTERBANKS, filterbank

    print("| filterbank | shape | nonzero | float, tol 1e-3 | auto, tol 1e-3 | int4/g32: error, bytes | auto at that error | seconds (auto, 1e-3) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in FILTERBANKS:
        w = filterbank(name)
        _, flt = _timed(w, 1e-3, 1)
        seconds, auto = _timed(w, 1e-3, 1, precision="auto")
        err4, bytes4 = _uniform(w, Storage.INT4, 32)
        _, at4 = _timed(w, min(err4, 0.5), 1, precision="auto")
        print(
            f"| {name} | {w.shape[0]}x{w.shape[1]} | {np.count_nonzero(w) / w.size:.3f} | {flt.byte_ratio:.4f} | "
            f"{auto.byte_ratio:.4f} | {err4:.4f}, {bytes4:.4f} | {at4.byte_ratio:.4f} | {seconds:.2f} |"
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", nargs="+", choices=["log", "gaussian", "filterbanks"], default=["log", "gaussian", "filterbanks"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--tols", type=float, nargs="+", default=[1e-2, 1e-4])
    parser.add_argument("--oracle-max", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs")
    args = parser.parse_args()
    for suite in args.suite:
        {"log": log_suite, "gaussian": gaussian_suite, "filterbanks": filterbank_suite}[suite](args)


if __name__ == "__main__":
    main()
