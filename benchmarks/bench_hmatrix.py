"""Time and storage of compress() on n x n 1-D log-kernel matrices, beside the simple choices.

Run by hand:  python benchmarks/bench_hmatrix.py [--sizes 1024 2048 4096 8192] [--oracle-max 2048]

Prints a Markdown table: seconds, stored/dense ratio, and the ratio of our storage to the best
of the "simple choices" of tests/hmatrix/oracle.py (dense, global truncated SVD, fixed 2x2/4x4/8x8
block low-rank, HODLR with 64-wide leaves, all with the same global budget). The oracle needs
exact SVDs of large blocks, so it is computed only up to --oracle-max. The fitted exponent of
time against n is printed per tolerance.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dehm_onnx.hmatrix import compress  # noqa: E402
from tests.hmatrix.matrices import log_kernel_1d  # noqa: E402
from tests.hmatrix.oracle import oracle_params  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--tols", type=float, nargs="+", default=[1e-2, 1e-4])
    parser.add_argument("--oracle-max", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs")
    args = parser.parse_args()

    print("| n | tol | seconds | stored/dense | blocks (zero/dense/low-rank) | max rank | ours / best simple choice (which) |")
    print("|---|---|---|---|---|---|---|")
    times = {tol: [] for tol in args.tols}
    for n in args.sizes:
        w = log_kernel_1d(n, np.random.default_rng(0)).astype(np.float32)
        for tol in args.tols:
            best_time, hm = np.inf, None
            for _ in range(args.repeats):
                start = time.perf_counter()
                hm = compress(w, tol)
                best_time = min(best_time, time.perf_counter() - start)
            times[tol].append(best_time)
            c = hm.counts()
            oracle = "—"
            if n <= args.oracle_max:
                o = oracle_params(w.astype(np.float64), tol)
                which = min(o, key=o.get)
                oracle = f"{hm.params / o[which]:.2f} ({which})"
            print(f"| {n} | {tol:g} | {best_time:.2f} | {hm.ratio:.4f} | {c['zero']}/{c['dense']}/{c['lowrank']} | {hm.max_rank} | {oracle} |")
    if len(args.sizes) > 1:
        for tol, ts in times.items():
            slope = np.polyfit(np.log(args.sizes), np.log(ts), 1)[0]
            print(f"\ntol {tol:g}: time grows as n^{slope:.2f}")


if __name__ == "__main__":
    main()
