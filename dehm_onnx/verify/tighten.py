"""Verification inside ``optimize``: check layer bounds and the model end to end, tighten what fails.

Calibration samples are split (``held_out_count``): the last quarter is **held out**, measured
and reported only; the rest are the **checked** samples that every decision below uses.

1. **Layer bounds.** Each compressed layer's output error must hold on the *worst* checked
   sample: ``max_s ||X_s W - X_s W_H||_F / ||X_s W||_F <= tol_out``. The weight bound
   ``||W - W_H||_F <= tol ||W||_F`` does not imply it (rows of X may lie along the singular
   directions of W that the compression dropped). For a layer over its bound a tighter weight
   tol is chosen from its worst samples ``X_s`` (rows, or their Gram matrix ``G_s = X_s^T X_s``):

   * the exact output error of any candidate ``W_H`` on sample s is ``||X_s E||_F`` with
     ``E = W - W_H``, so candidate tols are tried in numpy, without running the model;
   * ``||X_s E||_F <= ||X_s||_2 ||E||_F`` gives a tol that always suffices,
     ``t_safe = min_s tol_out ||X_s W||_F / (||X_s||_2 ||W||_F)``; the search halves the tol
     from ``tol * tol_out / measured`` down to ``t_safe`` and takes the first that meets
     ``SAFETY * tol_out`` on every kept sample.

2. **The model end to end** (unless ``no_model_check``): every graph output's relative L2
   error, per sample, on checked *and* held-out samples, must be ``<= model tolerance``
   (``max_model_error`` if given, else ``tol_out``, else ``tol``). If it is not, every
   compressed layer's tol is multiplied by ``min(1/2, SAFETY * target / error)``.

The model is rewritten with the new per-layer tols and verified again, at most ``MAX_ROUNDS``
times. A layer whose bound cannot be met by a compressed form that stores fewer parameters
than W is left dense (``OUTPUT_BOUND``). If the end-to-end tolerance still fails after the
last round, every compressed layer is left dense (``MODEL_ERROR_TARGET``), which meets it.
If a layer bound still fails, ``BoundViolation``.

``max_model_error`` first runs the allocation search (``allocate``) on the checked samples;
when no tol meets it, nothing is compressed, every candidate layer says why
(``MODEL_ERROR_TARGET``) and ``BoundViolation`` is raised unless ``accept_dense`` is set.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math

import numpy as np

from ..errors import BoundViolation, ConfigError
from .calibration import DEFAULT_NUM_SAMPLES, held_out_count, resolve_calibration
from .check import SAFETY, verify
from .runner import CalibrationRunError

__all__ = ["MAX_ROUNDS", "SAFETY", "TOL_FLOOR", "calibration_for", "verify_and_tighten", "tighter_tol"]

logger = logging.getLogger(__name__)

MAX_ROUNDS = 4
# Below this weight tol a float32 layer is as good as dense; leave it dense.
TOL_FLOOR = 1e-7

LEFT_DENSE = "OUTPUT_BOUND"
MODEL_TARGET = "MODEL_ERROR_TARGET"


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


def _sample_sq(sample: np.ndarray, m: np.ndarray) -> float:
    """``||X_s M||_F^2`` for a sample kept as rows X_s (fewer rows than columns) or as its
    Gram matrix ``X_s^T X_s`` (square; kept only for samples with at least m rows)."""
    if sample.shape[0] == sample.shape[1]:
        return max(float(np.sum(m * (sample @ m))), 0.0)
    product = sample @ m
    return float(np.vdot(product, product))


def _sample_norm2(sample: np.ndarray) -> float:
    """``||X_s||_2`` of a sample kept as rows or as its Gram matrix."""
    if sample.shape[0] == sample.shape[1]:
        return math.sqrt(max(float(np.linalg.eigvalsh(sample)[-1]), 0.0))
    return float(np.linalg.norm(sample, 2))


def tighter_tol(w: np.ndarray, stats, tol: float, tol_out: float, measured: float, seed: int = 0,
                precision: str = "float", block_overhead: int = 64):
    """A weight tol whose compression of ``w`` meets ``tol_out`` on the layer's worst samples.

    Args:
        w: the layer's weight in ``Y = X @ W`` orientation.
        stats: the layer's ``LayerStats`` (Gram matrix of X and its worst samples), or None.
        tol: the weight tol that failed.
        tol_out: the layer's output bound.
        measured: the worst output error measured with ``tol``.
        seed: seed passed to ``compress`` (the rewrite uses the same).
        precision, block_overhead: passed to ``compress`` as the rewrite does; the compressed
            form must take fewer bytes than ``w``.

    Returns:
        The new tol (< ``tol``), or None when the layer should be left dense.
    """
    from ..hmatrix import compress

    target = SAFETY * tol_out
    first = tol * min(0.5, target / measured) if measured > 0 else tol * 0.5
    if stats is None or stats.width != w.shape[0]:
        return first if first >= TOL_FLOOR else None
    w64 = w.astype(np.float64)
    samples = [s for _, s in stats.worst] or [stats.inputs]
    refs = [_sample_sq(s, w64) for s in samples]
    kept = [(s, r) for s, r in zip(samples, refs) if r > 0.0]
    if not kept:
        return None
    w_norm = float(np.linalg.norm(w64))
    t_safe = min(target * math.sqrt(r) / (max(_sample_norm2(s), 1e-300) * w_norm) for s, r in kept)
    t = first
    while True:
        t = max(t, t_safe)
        if t < TOL_FLOOR:
            return None
        hm = compress(w, min(t, 0.999), seed=seed, precision=precision, block_overhead=block_overhead)
        if hm.nbytes >= w.nbytes:
            return None  # a tighter tol can only store more
        if t <= t_safe:
            return t
        e = w64 - hm.to_dense(np.float64)
        if all(math.sqrt(_sample_sq(s, e) / r) <= target for s, r in kept):
            return t
        t *= 0.5


def _weights_by_layer(model) -> dict:
    """Candidates by layer name; their weights are read on use (external ones from the
    ``model_io.weights_from`` folder)."""
    from ..graph.scan import scan
    from ..model_io import from_proto

    return {c.name: c for c in scan(from_proto(model)).candidates}


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
            record.skip_reason, record.reason = dense[record.name]


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


def _violator_stats(original, optimized, calib, report, result, held) -> dict:
    """Input Gram matrices and worst samples of the violating layers only (m x m each)."""
    violators = {v.name for v in result.violations}
    layers = [r.metadata_entry() for r in report.compressed if r.name in violators]
    return verify(original, optimized, calib, layers=layers, collect_stats=True, held_out=held).stats


def _plan_tighter_tols(original, result, stats, layer_tols, dense, round_number, config) -> list:
    """Choose a tighter tol (or dense) for every violating layer; updates ``layer_tols``/``dense``."""
    from ..graph.rewrite import BLOCK_OVERHEAD

    candidates = _weights_by_layer(original)
    steps = []
    for check in result.violations:
        current = layer_tols.get(check.name, check.tol if check.tol is not None else config.tol)
        cand = candidates.get(check.name)
        new = None
        if cand is not None:
            new = tighter_tol(cand.weight, stats.get(check.name), current, check.tol_out,
                              check.rel_fro_error, config.seed, config.engine_precision, BLOCK_OVERHEAD)
        steps.append({"layer": check.name, "round": round_number, "measured": check.rel_fro_error,
                      "tol": current, "new_tol": new, "why": "layer output bound (worst sample)"})
        if new is None:
            dense[check.name] = (LEFT_DENSE, f"left dense: output error {check.rel_fro_error:.2e} (worst sample) > "
                                 f"tol_out {check.tol_out:.2e} on calibration data, and no compressed form that "
                                 "meets it is smaller")
            layer_tols.pop(check.name, None)
        else:
            layer_tols[check.name] = new
        logger.info("tightening layer %r: measured %.3e > tol_out %.3e; tol %.3e -> %s",
                    check.name, check.rel_fro_error, check.tol_out, current, new)
    return steps


def _tighten_for_model(report, result, layer_tols, dense, round_number, target, config) -> list:
    """Scale every compressed layer's tol down after an end-to-end failure; too small -> dense."""
    worst = result.worst_output
    error = worst.worst_all
    factor = max(min(0.5, SAFETY * target / error), 1e-3) if math.isfinite(error) and error > 0 else 1e-3
    steps = []
    for record in report.compressed:
        current = layer_tols.get(record.name, record.tol if record.tol is not None else config.tol)
        new = current * factor
        steps.append({"layer": record.name, "round": round_number, "measured": error, "tol": current,
                      "new_tol": new if new >= TOL_FLOOR else None,
                      "why": f"model output {worst.name!r} error {error:.2e} > model tolerance {target:.2e}"})
        if new < TOL_FLOOR:
            dense[record.name] = (MODEL_TARGET, _model_dense_reason(worst.name, error, target, current))
            layer_tols.pop(record.name, None)
        else:
            layer_tols[record.name] = new
    logger.info("model output %r: error %.3e > %.3e; every layer's tol times %.3g", worst.name, error, target, factor)
    return steps


def _model_dense_reason(output: str, error: float, target: float, tol: float) -> str:
    return (f"left dense: end-to-end error of output {output!r} {error:.2e} > model tolerance {target:.2e} "
            f"with this layer compressed at tol {tol:.2e} (worst sample)")


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


def _unreachable(original, allocation, config, rewrite):
    """Nothing compressed: every layer that a tol could compress says the target is not reachable."""
    best = ""
    if allocation.best_tol is not None:
        best = (f": the smallest model error with a layer compressed was {allocation.error:.2e} "
                f"(tol {allocation.best_tol:.1e})")
    sentence = f"max_model_error {allocation.target:.2e} is not reachable by compressing anything{best}"
    model, report = rewrite(original, allocation.config)
    mine = {"EXCLUDED", "NOT_SMALLER", "LITTLE_GAIN"}
    for record in report.layers:
        if record.name in allocation.excluded or record.skip_reason in mine - {"EXCLUDED"}:
            record.skip_reason, record.reason = MODEL_TARGET, sentence
    report.verification = {"performed": True, "model_tol": allocation.target, "allocation": allocation.to_dict(),
                           "unreachable": sentence, "left_dense": sorted(allocation.excluded)}
    if not config.accept_dense:
        raise BoundViolation(f"{sentence}; nothing written (pass --accept-dense to write the model uncompressed)", [])
    logger.warning("%s; every layer left dense (--accept-dense)", sentence)
    return model, report


def _summary_lines(result) -> list:
    lines = [layer.summary() for layer in result.layers]
    for o in result.outputs:
        held = f", {o.worst_held_out:.2g} (held out)" if o.worst_held_out is not None else ""
        lines.append(f"output {o.name}: rel. L2 error worst {o.worst:.2g} (calibration){held}, median {o.median:.2g}")
    return lines


def verify_and_tighten(original, optimized, report, config, rewrite):
    """Verify ``optimized`` against ``original``; recompress layers until every check holds.

    Args:
        original, optimized: ModelProtos (``optimized`` as written by ``rewrite``).
        report: the rewrite's Report (updated in place: measured errors, verification).
        config: the OptimizeConfig (fields tol, tol_out, no_verify, no_model_check,
            accept_dense, calibration, input_shape, input_range, num_samples,
            max_model_error, seed).
        rewrite: ``rewrite(original, config, layer_tols) -> (model, report)``.

    Returns:
        ``(model, report)``: every compressed layer holds its bound on the worst checked
        sample, and the graph outputs meet the model tolerance on every sample.

    Raises:
        BoundViolation: a layer bound still fails after tightening, or ``max_model_error``
            is not reachable (unless ``accept_dense``).
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
    held = held_out_count(calib.num_samples)
    checked = calib.subset(range(calib.num_samples - held))
    tol_out = config.layer_tol_out
    allocation = None
    if config.max_model_error is not None:
        allocation = _allocate(original, checked, config, rewrite)
        if allocation.tol is None:
            return _unreachable(original, allocation, config, rewrite)
        config = allocation.config
        optimized, report = rewrite(original, config, allocation.layer_tols)
        tol_out = config.layer_tol_out
    model_tol = None if config.no_model_check else (
        config.max_model_error if config.max_model_error is not None else tol_out)
    # Under max_model_error each layer's output bound is its allocated tol, unless tol_out was given.
    tol_outs = dict(allocation.layer_tols) if allocation and config.tol_out is None else {}
    layer_tols, dense, steps = dict(tol_outs), {}, []
    for round_index in range(MAX_ROUNDS + 2):
        _set_tol_out(report, tol_out, tol_outs)
        try:
            result = verify(original, optimized, calib, layers=[r.metadata_entry() for r in report.compressed],
                            held_out=held)
        except CalibrationRunError as e:
            if e.which != "original" or _user_calibration(config):
                raise
            return optimized, _unverifiable(report, e)
        model_ok = model_tol is None or result.model_error() <= model_tol
        if (result.ok and model_ok) or round_index == MAX_ROUNDS + 1:
            break
        if round_index == MAX_ROUNDS:
            if not result.ok:
                break
            worst = result.worst_output  # last resort: every layer dense meets any model tolerance
            for record in report.compressed:
                tol = layer_tols.get(record.name, record.tol)
                dense[record.name] = (MODEL_TARGET, _model_dense_reason(worst.name, worst.worst_all, model_tol, tol))
        elif not result.ok:
            stats = _violator_stats(original, optimized, calib, report, result, held)
            steps += _plan_tighter_tols(original, result, stats, layer_tols, dense, round_index + 1, config)
            del stats
        else:
            steps += _tighten_for_model(report, result, layer_tols, dense, round_index + 1, model_tol, config)
        optimized, report = rewrite(original, _exclude_dense(config, dense), layer_tols)
    _note_results(report, result, dense)
    _write_layers_metadata(optimized, report)
    report.verification = {
        "performed": True,
        "tol_out": tol_out,
        "model_tol": model_tol,
        "calibration": result.calibration,
        "generated": result.generated,
        "inputs": dict(result.how),
        "num_samples": result.num_samples,
        "held_out": held,
        "tightened": steps,
        "left_dense": sorted(dense),
        "allocation": allocation.to_dict() if allocation else None,
        "summary": _summary_lines(result),
        "result": result.to_dict(),
    }
    result.raise_if_violated()
    if model_tol is not None and result.model_error() > model_tol:
        worst = result.worst_output
        raise BoundViolation(
            f"model output {worst.name!r}: rel. L2 error {worst.worst_all:.3e} (worst sample) > model tolerance "
            f"{model_tol:.3e} on the calibration set", []
        )
    return optimized, report
