"""Cluster trees: bisection of an index range, optionally after a PCA-based reordering.

Every tree here splits a node of ``s > leaf_size`` indices into a left child of ``s // 2``
and a right child of ``s - s // 2`` indices. Coarser bisection partitions (2x2, 4x4, HODLR with
wider leaves) are therefore sub-trees of a finer one, which is what lets the adaptive search
contain them.

The PCA ordering treats the rows (or columns) of a weight as points and reorders them by
recursive principal-direction bisection, so that similar rows end up next to each other;
neuron order in a trained layer is arbitrary, and a good order can create block structure.
"""

from __future__ import annotations

import numpy as np

__all__ = ["split_sizes", "pca_order"]


def split_sizes(size: int) -> tuple[int, int]:
    """Sizes of the two children of a node of ``size`` indices."""
    half = size // 2
    return half, size - half


def _leading_direction(points: np.ndarray, mean: np.ndarray, rng: np.random.Generator, iterations: int = 6) -> np.ndarray:
    """Leading principal direction of ``points`` (rows) by power iteration.

    Centering is applied implicitly, ``(P - 1 mean^T) v = P v - (mean . v)``, so the
    points are never copied.
    """
    v = rng.standard_normal(points.shape[1]).astype(points.dtype)
    for _ in range(iterations):
        y = points @ v - mean @ v
        v = points.T @ y - mean * y.sum()
        norm = np.linalg.norm(v)
        if norm == 0.0:
            break
        v /= norm
    return v


def pca_order(points: np.ndarray, leaf_size: int, rng: np.random.Generator) -> np.ndarray:
    """Order the rows of ``points`` by recursive PCA bisection.

    At each node of more than ``leaf_size`` rows, the rows are sorted by their projection on
    the node's principal direction and split into halves of the bisection sizes.

    Returns:
        A permutation ``perm`` of ``range(len(points))``; ``points[perm]`` is the new order.
    """
    perm = np.arange(points.shape[0])
    stack = [(0, points.shape[0])]
    while stack:
        start, end = stack.pop()
        if end - start <= leaf_size:
            continue
        idx = perm[start:end]
        sub = points[idx]
        mean = sub.mean(axis=0)
        projection = sub @ _leading_direction(sub, mean, rng)
        perm[start:end] = idx[np.argsort(projection, kind="stable")]
        left, _ = split_sizes(end - start)
        stack += [(start, start + left), (start + left, end)]
    return perm
