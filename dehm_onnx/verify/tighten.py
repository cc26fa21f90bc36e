"""Verification inside ``optimize``: check every layer's output bound, tighten what fails.

The weight bound ``||W - W_H||_F <= tol ||W||_F`` does not imply the output bound
``||X W - X W_H||_F <= tol_out ||X W||_F`` (calibration rows X may lie along the singular
directions of W that the compression dropped). For a layer over its output bound this module
picks a tighter weight tol from the layer's calibration input, through its Gram matrix
``G = X^T X`` (X = the original model's input rows to that layer):

* the exact output error of any candidate ``W_H`` is ``||X E||_F^2 = sum(E * (G E))`` with
  ``E = W - W_H``, so candidate tols are tried in numpy, without running the model;
* ``||X E||_F <= ||X||_2 ||E||_F`` gives a tol that always suffices,
  ``t_safe = tol_out ||X W||_F / (||X||_2 ||W||_F)``; the search halves the tol from
  ``tol * tol_out / measured`` down to ``t_safe`` and takes the first that meets the bound.

The model is then rewritten with the new per-layer tols and verified again in onnxruntime,
at most ``MAX_ROUNDS`` times. A layer whose bound cannot be met by a compressed form that
stores fewer parameters than W is left dense. If a bound still fails, ``BoundViolation``.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math

import numpy as np

from ..errors import BoundViolation, ConfigError
from .calibration import DEFAULT_NUM_SAMPLES, resolve_calibration
from .check import verify
from .runner import CalibrationRunError

__all__ = ["MAX_ROUNDS", "SAFETY", "TOL_FLOOR", "calibration_for", "verify_and_tighten", "tighter_tol"]

logger = logging.getLogger(__name__)

MAX_ROUNDS = 4
# Aim this far below tol_out: onnxruntime evaluates in the model's dtype, the search in float64.
SAFETY = 0.9
# Below this weight tol a float32 layer is as good as dense; leave it dense.
TOL_FLOOR = 1e-7

LEFT_DENSE = "OUTPUT_BOUND"


def calibration_for(original, config):
    """The calibration set that ``config`` (calibration/input_shape/input_range/...) asks for."""
    return resolve_calibration(
        original,
        list(config.calibration) or None,
        num_samples=config.num_samples or DEFAULT_NUM_SAMPLES,
        input_shapes=list(config.input_shape),
        input_ranges=list(config.input_range),
        seed=config.seed,
    )


def _exact_rel_error(w: np.ndarray, w_h: np.ndarray, gram: np.ndarray, ref_sq: float) -> float:
    e = w - w_h
    return math.sqrt(max(float(np.sum(e * (gram @ e))), 0.0) / ref_sq)


def tighter_tol(w: np.ndarray, stats, tol: float, tol_out: float, measured: float, seed: int = 0):
    """A weight tol whose compression of ``w`` meets ``tol_out`` on the calibration rows.

    Args:
        w: the layer's weight in ``Y = X @ W`` orientation.
        stats: the layer's ``LayerStats`` (Gram matrix of X), or None if unavailable.
        tol: the weight tol that failed.
        tol_out: the layer's output bound.
        measured: the output error measured with ``tol``.
        seed: seed passed to ``compress`` (the rewrite uses the same).

    Returns:
        The new tol (< ``tol``), or None when the layer should be left dense.
    """
    from ..hmatrix import compress

    target = SAFETY * tol_out
    first = tol * min(0.5, target / measured) if measured > 0 else tol * 0.5
    if stats is None or stats.gram.shape[0] != w.shape[0]:
        return first if first >= TOL_FLOOR else None
    w64 = w.astype(np.float64)
    gram = stats.gram
    ref_sq = float(np.sum(w64 * (gram @ w64)))
    if ref_sq == 0.0:
        return None
    t_safe = target * math.sqrt(ref_sq) / (max(stats.spectral_norm, 1e-300) * float(np.linalg.norm(w64)))
    t = first
    while True:
        t = max(t, t_safe)
        if t < TOL_FLOOR:
            return None
        hm = compress(w, min(t, 0.999), seed=seed)
        if hm.params >= hm.dense_params:
            return None  # a tighter tol can only store more
        if t <= t_safe or _exact_rel_error(w64, hm.to_dense(np.float64), gram, ref_sq) <= target:
            return t
        t *= 0.5


def _weights_by_layer(model) -> dict:
    from ..graph.scan import scan

    return {c.name: c for c in scan(model).candidates}


def _set_tol_out(report, tol_out: float, per_layer: dict) -> None:
    for record in report.compressed:
        record.tol_out = per_layer.get(record.name, tol_out)


def _write_layers_metadata(model, report) -> None:
    """Make the model's ``dehm.layers`` match the final records (their tol_out may differ per layer)."""
    from ..report import LAYERS_KEY

    value = json.dumps([r.metadata_entry() for r in report.compressed])
    for prop in model.metadata_props:
        if prop.key == LAYERS_KEY:
            prop.value = value


def _note_results(report, result, dense: dict) -> None:
    checks = {c.name: c for c in result.layers}
    for record in report.layers:
        check = checks.get(record.name)
        if check is not None and record.compressed:
            record.measured_error = check.rel_fro_error
        if record.name in dense and not record.compressed:
            record.skip_reason = LEFT_DENSE
            record.reason = dense[record.name]


def _exclude_dense(config, dense: dict):
    patterns = tuple(glob.escape(name) for name in dense)
    return dataclasses.replace(config, exclude=tuple(config.exclude) + patterns)


def _user_calibration(config) -> bool:
    return bool(config.calibration or config.input_shape or config.input_range)


def _unverifiable(report, error):
    # Generated inputs that the *original* model rejects say nothing about the optimization;
    # the model is returned unverified, and the report and a warning say why.
    reason = (
        f"generated calibration inputs do not run on the original model ({error}); "
        "pass --calibration or --input-shape/--input-range to verify"
    )
    logger.warning("verification not performed: %s", reason)
    report.verification = {"performed": False, "reason": reason}
    return report


def _violator_stats(original, optimized, calib, report, result) -> dict:
    """Input Gram matrices of the violating layers only (they can be large: m x m each)."""
    violators = {v.name for v in result.violations}
    layers = [r.metadata_entry() for r in report.compressed if r.name in violators]
    return verify(original, optimized, calib, layers=layers, collect_stats=True).stats


def _plan_tighter_tols(original, result, stats, layer_tols, dense, round_number, config) -> list:
    """Choose a tighter tol (or dense) for every violating layer; updates ``layer_tols``/``dense``."""
    candidates = _weights_by_layer(original)
    steps = []
    for check in result.violations:
        current = layer_tols.get(check.name, check.tol if check.tol is not None else config.tol)
        cand = candidates.get(check.name)
        new = None
        if cand is not None:
            new = tighter_tol(cand.weight, stats.get(check.name), current, check.tol_out,
                              check.rel_fro_error, config.seed)
        steps.append({"layer": check.name, "round": round_number, "measured": check.rel_fro_error,
                      "tol": current, "new_tol": new})
        if new is None:
            dense[check.name] = (f"left dense: output error {check.rel_fro_error:.2e} > tol_out {check.tol_out:.2e} "
                                 "on calibration data, and no compressed form that meets it is smaller")
            layer_tols.pop(check.name, None)
        else:
            layer_tols[check.name] = new
        logger.info("tightening layer %r: measured %.3e > tol_out %.3e; tol %.3e -> %s",
                    check.name, check.rel_fro_error, check.tol_out, current, new)
    return steps


def _allocate(original, calib, config, rewrite):
    """Run the max_model_error allocation; generated inputs the original rejects are a ConfigError."""
    from .allocate import allocate_tol

    try:
        return allocate_tol(original, calib, config, rewrite)
    except CalibrationRunError as e:
        if e.which != "original" or _user_calibration(config):
            raise
        raise ConfigError(
            f"max_model_error needs calibration inputs that the original model runs on ({e}); "
            "pass --calibration or --input-shape/--input-range"
        ) from e


def verify_and_tighten(original, optimized, report, config, rewrite):
    """Verify ``optimized`` against ``original``; recompress layers over their output bound.

    Args:
        original, optimized: ModelProtos (``optimized`` as written by ``rewrite``).
        report: the rewrite's Report (updated in place: measured errors, verification).
        config: the OptimizeConfig (fields tol, tol_out, no_verify, calibration, input_shape,
            input_range, num_samples, max_model_error, seed).
        rewrite: ``rewrite(original, config, layer_tols) -> (model, report)``.

    Returns:
        ``(model, report)`` whose every compressed layer holds its bound on the calibration set.

    Raises:
        BoundViolation: a bound (or ``max_model_error``) still fails after tightening.
    """
    if config.no_verify:
        report.verification = {"performed": False, "reason": "skipped (no_verify / --no-verify)"}
        return optimized, report
    if not report.compressed and config.max_model_error is None:
        if _user_calibration(config):
            calibration_for(original, config)  # bad options are errors even with nothing to check
        report.verification = {"performed": False, "reason": "no layer was compressed"}
        return optimized, report
    calib = calibration_for(original, config)
    allocation = None
    if config.max_model_error is not None:
        allocation = _allocate(original, calib, config, rewrite)
        config = allocation.config
        optimized, report = rewrite(original, config, allocation.layer_tols)
    tol_out = config.layer_tol_out
    # Under max_model_error each layer's output bound is its allocated tol, unless tol_out was given.
    tol_outs = dict(allocation.layer_tols) if allocation and config.tol_out is None else {}
    layer_tols, dense, steps = dict(tol_outs), {}, []
    for round_index in range(MAX_ROUNDS + 1):
        _set_tol_out(report, tol_out, tol_outs)
        try:
            result = verify(original, optimized, calib, layers=[r.metadata_entry() for r in report.compressed])
        except CalibrationRunError as e:
            if e.which != "original" or _user_calibration(config):
                raise
            return optimized, _unverifiable(report, e)
        if result.ok or round_index == MAX_ROUNDS:
            break
        stats = _violator_stats(original, optimized, calib, report, result)
        steps += _plan_tighter_tols(original, result, stats, layer_tols, dense, round_index + 1, config)
        optimized, report = rewrite(original, _exclude_dense(config, dense), layer_tols)
    _note_results(report, result, dense)
    _write_layers_metadata(optimized, report)
    report.verification = {
        "performed": True,
        "tol_out": tol_out,
        "calibration": result.calibration,
        "num_samples": result.num_samples,
        "tightened": steps,
        "left_dense": sorted(dense),
        "allocation": allocation.to_dict() if allocation else None,
        "result": result.to_dict(),
    }
    result.raise_if_violated()
    if config.max_model_error is not None and result.max_rel_l2 > config.max_model_error:
        worst = max(result.outputs, key=lambda o: o.rel_l2)
        raise BoundViolation(
            f"model output {worst.name!r}: rel. L2 error {worst.rel_l2:.3e} > max_model_error "
            f"{config.max_model_error:.3e} on the calibration set", []
        )
    return optimized, report
