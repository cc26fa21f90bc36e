"""``max_model_error``: the largest shared per-layer tol meeting an end-to-end error target.

Allocation rule: every compressed layer gets the same weight tol ``t`` (and, unless the user
set ``tol_out``, the same output bound ``t``). ``t`` is searched on the geometric grid
``TOL_MAX * GRID_RATIO**k`` down to ``TOL_MIN`` by bisection, assuming the end-to-end error
grows with ``t``: each probe rewrites the model at ``t`` and runs it on the calibration
samples it is given (the checked ones; the caller holds some out); the end-to-end error is the
largest per-sample relative L2 error over the graph outputs and samples, and infinite when an
output is NaN/Inf where the original's is finite. The largest grid ``t`` whose error is
``<= max_model_error`` wins. If even ``TOL_MIN`` misses the target, or only a tol at which no
layer compresses any more meets it, the target is not reachable by compressing anything: ``t``
is None and ``excluded`` names the layers some probe could compress.

A shared tol is the allocation that needs no model of how errors propagate: each layer's
relative output error stays about ``t``, and the grid search measures how the network
combines them. The per-layer verification then runs as usual at ``t`` (tightening any layer
whose calibration inputs align with dropped directions), and the final model is checked
against ``max_model_error`` once more.
"""

from __future__ import annotations

import dataclasses
import glob
import logging

import numpy as np

from ..errors import ConfigError
from .check import _OutputAccumulator
from .runner import make_cpu_session, run_samples

__all__ = ["GRID_RATIO", "REFINE_PROBES", "TOL_MAX", "TOL_MIN", "Allocation", "allocate_tol", "tol_grid", "model_error"]

logger = logging.getLogger(__name__)

TOL_MAX = 0.5
TOL_MIN = 1e-6
GRID_RATIO = 2.0**-0.5
# Extra model runs allowed for the per-layer loosening after the shared tol is found.
REFINE_PROBES = 8


def tol_grid(tol_max: float = TOL_MAX, tol_min: float = TOL_MIN, ratio: float = GRID_RATIO) -> list:
    """The candidate tols, largest first: ``tol_max * ratio**k >= tol_min``."""
    count = int(np.floor(np.log(tol_min / tol_max) / np.log(ratio) + 1e-9)) + 1
    return [float(tol_max * ratio**k) for k in range(count)]


@dataclasses.dataclass
class Allocation:
    """Result of the search: the chosen shared tol and every probe made."""

    tol: float | None
    error: float | None
    target: float
    probes: list
    config: object = dataclasses.field(repr=False, default=None)
    layer_tols: dict = dataclasses.field(default_factory=dict)
    refinements: list = dataclasses.field(default_factory=list)
    excluded: tuple = ()
    best_tol: float | None = None

    def to_dict(self) -> dict:
        """JSON-ready summary for the report."""
        return {
            "rule": "shared tol, bisection over a geometric grid; then per-layer loosening, largest layers first",
            "target": self.target,
            "tol": self.tol,
            "error": self.error,
            "probes": [{"tol": t, "error": e} for t, e in self.probes],
            "layer_tols": dict(self.layer_tols),
            "refinements": list(self.refinements),
            "unreachable": self.tol is None,
        }


def _graph_outputs(model) -> list:
    return [o.name for o in model.graph.output]


def _reference_outputs(original, samples: list) -> list:
    session = make_cpu_session(original)
    return list(run_samples(session, samples, _graph_outputs(original), "original"))


def model_error(candidate, reference: list, samples: list) -> float:
    """Worst per-sample relative L2 error over the graph outputs of ``candidate`` vs the
    reference runs (infinite where an output is NaN/Inf and the original's is finite)."""
    names = list(reference[0]) if reference else []
    session = make_cpu_session(candidate)
    accumulators = {name: _OutputAccumulator(name) for name in names}
    for ref, got in zip(reference, run_samples(session, samples, names, "optimized")):
        for name, acc in accumulators.items():
            acc.add(ref[name], got[name])
    return max((acc.result().worst for acc in accumulators.values()), default=0.0)


def allocate_tol(original, calibration, config, rewrite) -> Allocation:
    """Find the largest shared tol whose end-to-end error is ``<= config.max_model_error``.

    Args:
        original: the original ModelProto.
        calibration: a CalibrationSet.
        config: OptimizeConfig with ``max_model_error`` set.
        rewrite: ``rewrite(original, config) -> (model, report)``.

    Returns:
        An Allocation whose ``config`` has ``tol`` set to the chosen value (or, when no grid
        tol meets the target, an ``exclude`` of every layer so nothing is compressed).
    """
    target = float(config.max_model_error)
    if not 0.0 < target < 1.0:
        raise ConfigError(f"max_model_error must be in (0, 1), got {config.max_model_error!r}")
    samples = list(calibration.samples())
    reference = _reference_outputs(original, samples)
    grid = tol_grid()
    probes, cache, compressible, compressed_at = [], {}, {}, {}

    def error_at(index: int) -> float:
        if index not in cache:
            candidate, report = rewrite(original, dataclasses.replace(config, tol=grid[index]))
            compressed_at[index] = [r.name for r in report.compressed]
            compressible.update(dict.fromkeys(compressed_at[index]))
            cache[index] = model_error(candidate, reference, samples)
            probes.append((grid[index], cache[index]))
            logger.info("max_model_error search: tol %.3e -> model error %.3e", grid[index], cache[index])
        return cache[index]

    # Invariant: error_at(lo) > target (or lo == -1), error_at(hi) <= target (or hi == len).
    lo, hi = -1, len(grid)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if error_at(mid) <= target:
            hi = mid
        else:
            lo = mid
    if hi == len(grid) or (compressible and not compressed_at[hi]):
        # Met only by compressing nothing (every layer dense at the tol that meets it).
        names = tuple(compressible)
        chosen = dataclasses.replace(config, exclude=tuple(config.exclude) + tuple(glob.escape(n) for n in names))
        tried = [(grid[i], cache[i]) for i in cache if compressed_at[i]]
        best = min(tried, key=lambda p: p[1]) if tried else None
        return Allocation(None, best[1] if best else None, target, probes, chosen, excluded=names,
                          best_tol=best[0] if best else None)
    shared = dataclasses.replace(config, tol=grid[hi])
    allocation = Allocation(grid[hi], cache[hi], target, probes, shared)
    _loosen_layers(allocation, original, rewrite, grid, hi, lambda m: model_error(m, reference, samples))
    return allocation


def _loosen_layers(allocation: Allocation, original, rewrite, grid: list, index: int, error_of) -> None:
    """Greedy second stage: raise single layers' tols one grid step at a time.

    Layers are visited largest weight first; a step is kept while the end-to-end error stays
    within the target. At most ``REFINE_PROBES`` extra model runs.
    """
    _, report = rewrite(original, allocation.config)
    names = [r.name for r in sorted(report.layers, key=lambda r: -(r.dense_params or 0))
             if r.compressed or r.skip_reason == "NOT_SMALLER"]
    if len(names) < 2:
        return  # one layer: the shared search already tried the next grid step
    steps = {name: index for name in names}
    budget = REFINE_PROBES
    for name in names:
        while steps[name] > 0 and budget > 0:
            trial = {**steps, name: steps[name] - 1}
            layer_tols = {n: grid[i] for n, i in trial.items() if i != index}
            candidate, _ = rewrite(original, allocation.config, layer_tols)
            error = error_of(candidate)
            budget -= 1
            allocation.refinements.append({"layer": name, "tol": grid[trial[name]], "error": error})
            if error > allocation.target:
                break
            steps, allocation.error, allocation.layer_tols = trial, error, layer_tols
