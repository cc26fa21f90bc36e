"""Structured test matrices with known compressibility (the suite the oracle runs on)."""

from __future__ import annotations

import numpy as np


def log_kernel_1d(n: int, rng: np.random.Generator, cols: int | None = None) -> np.ndarray:
    """``log|x_i - y_j|`` on sorted points: singular on the diagonal, smooth away from it."""
    x = np.sort(rng.random(n))
    y = np.sort(rng.random(cols or n)) + 0.5 / n
    return np.log(np.abs(x[:, None] - y[None, :]))


def exp_kernel_1d(n: int, cols: int | None = None, scale: float = 0.1) -> np.ndarray:
    """``exp(-|x_i - y_j| / scale)`` on a uniform grid."""
    x = np.linspace(0.0, 1.0, n)
    y = np.linspace(0.0, 1.0, cols or n)
    return np.exp(-np.abs(x[:, None] - y[None, :]) / scale)


def _kd_order(points: np.ndarray) -> np.ndarray:
    """Order 2-D points by recursive coordinate bisection (a kd-tree order)."""
    order = np.arange(len(points))

    def split(lo: int, hi: int, axis: int) -> None:
        if hi - lo <= 8:
            return
        idx = order[lo:hi]
        order[lo:hi] = idx[np.argsort(points[idx, axis], kind="stable")]
        mid = lo + (hi - lo) // 2
        split(lo, mid, 1 - axis)
        split(mid, hi, 1 - axis)

    split(0, len(points), 0)
    return order


def inverse_distance_2d(n: int, rng: np.random.Generator) -> np.ndarray:
    """``1 / |p_i - q_j|`` for 2-D points in kd order (q offset so no distance is zero)."""
    p = rng.random((n, 2))
    q = rng.random((n, 2)) + 1e-3
    p, q = p[_kd_order(p)], q[_kd_order(q)]
    return 1.0 / np.linalg.norm(p[:, None, :] - q[None, :, :], axis=2)


def mel_filterbank(n_fft_bins: int = 257, n_mels: int = 80, sample_rate: float = 16000.0) -> np.ndarray:
    """Triangular mel filterbank (frequency bins x mel bands): banded, mostly exact zeros."""
    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    freqs = np.linspace(0.0, sample_rate / 2, n_fft_bins)
    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2))
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    up = (freqs[:, None] - lower[None, :]) / (center - lower)[None, :]
    down = (upper[None, :] - freqs[:, None]) / (upper - center)[None, :]
    return np.maximum(0.0, np.minimum(up, down))


def low_rank_plus_noise(m: int, n: int, rank: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    """An exact rank-``rank`` matrix plus Gaussian noise of relative size ``noise``."""
    a = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n))
    return a + noise * np.linalg.norm(a) / np.sqrt(m * n) * rng.standard_normal((m, n))


def suite(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The named matrices of the oracle comparison."""
    shuffled = exp_kernel_1d(256, scale=0.05)
    shuffled = shuffled[rng.permutation(256)][:, rng.permutation(256)]
    return {
        "log1d_384": log_kernel_1d(384, rng),
        "exp1d_320": exp_kernel_1d(320),
        "invdist2d_300": inverse_distance_2d(300, rng),
        "mel_257x80": mel_filterbank(),
        "lowrank_noise_200x300": low_rank_plus_noise(200, 300, 7, 1e-6, rng),
        "gaussian_256": rng.standard_normal((256, 256)),
        "log1d_odd_333x129": log_kernel_1d(333, rng, cols=129),
        "exp1d_shuffled_256": shuffled,
        "row_1x300": exp_kernel_1d(1, cols=300),
        "col_300x1": exp_kernel_1d(300, cols=1),
        "zeros_100x70": np.zeros((100, 70)),
    }
