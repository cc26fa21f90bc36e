"""``compare``: one model, one calibration set, every method, one row each."""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ..api import load_model, save_model
from ..config import OptimizeConfig, make_config
from ..errors import ConfigError
from ..files import atomic_output
from ..verify.calibration import DEFAULT_NUM_SAMPLES, resolve_calibration
from .measure import file_bytes, layer_records, measure_errors, measure_latency, stored_params
from .methods import FIXED_METHODS, TOL_METHODS, Built, MethodSpec, _target, build

__all__ = ["ROW_KEYS", "METHODS", "DEFAULT_TOLS", "DEFAULT_ROUNDS", "CompareResult", "compare", "plan_rows", "workdir_files"]

logger = logging.getLogger(__name__)

# The keys of every row, in table order (the --json contract).
ROW_KEYS = (
    "method",
    "stored_params",
    "file_bytes",
    "output_rel_error",
    "max_layer_error",
    "latency_ms",
    "optimize_seconds",
)
METHODS = ("original",) + TOL_METHODS + FIXED_METHODS
DEFAULT_TOLS = (1e-3, 1e-2)
DEFAULT_ROUNDS = 21


@dataclass
class CompareResult:
    """Rows (dicts with exactly ``ROW_KEYS``), failures, and per-method details.

    Attributes:
        rows: one dict per method (and tol), in ``METHODS`` order.
        errors: row ``method`` -> one-line error for methods that failed (numbers are None).
        layer_errors: row ``method`` -> {layer name: measured isolated relative error}.
        certified: row ``method`` -> {layer name: certified relative weight error}
            (dehm, svd, pruning; layers left dense are absent).
        models: row ``method`` -> model file (inside ``workdir``; gone if it was temporary).
        calibration: description of the calibration set.
    """

    rows: list = field(default_factory=list)
    errors: dict = field(default_factory=dict)
    layer_errors: dict = field(default_factory=dict)
    certified: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)
    calibration: str = ""

    def row(self, method: str) -> dict:
        """The row whose ``method`` is ``method``."""
        for row in self.rows:
            if row["method"] == method:
                return row
        raise KeyError(method)

    def to_dict(self) -> dict:
        """``{"rows": [...]}`` plus ``errors`` when a method failed (JSON-ready)."""
        out = {"rows": [{k: _json_number(row[k]) for k in ROW_KEYS} for row in self.rows]}
        if self.errors:
            out["errors"] = dict(self.errors)
        return out


def _json_number(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def plan_rows(tols, methods) -> list:
    """The ``MethodSpec`` of every row: certified methods once per tol, others once.

    Raises:
        ConfigError: an unknown method, no tol for a certified method, or a tol outside (0, 1).
    """
    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    tols = [float(t) for t in tols]
    for tol in tols:
        if not 0.0 < tol < 1.0:
            raise ConfigError(f"tol must be in (0, 1), got {tol!r}")
    if not tols and any(m in TOL_METHODS for m in methods):
        raise ConfigError(f"methods {list(TOL_METHODS)} need at least one --tol")
    specs = []
    for method in METHODS:
        if method not in methods:
            continue
        if method in TOL_METHODS:
            specs += [MethodSpec(method, tol) for tol in tols]
        else:
            specs.append(MethodSpec(method))
    return specs


def workdir_files(tols, methods) -> list[str]:
    """Names of every file ``compare`` may write into its ``workdir`` for these rows."""
    models = [_target(Path(), spec).name for spec in plan_rows(tols, methods) if spec.method != "original"]
    models += ["input.onnx", "gemm_as_matmul.onnx"]
    return models + [f"{name}.data" for name in models] + ["calibration.npz"]


def compare(
    model,
    *,
    tols=DEFAULT_TOLS,
    methods=METHODS,
    calibration=None,
    input_shapes=None,
    input_ranges=None,
    num_samples: int | None = None,
    seed: int = 0,
    config: OptimizeConfig | None = None,
    rounds: int = DEFAULT_ROUNDS,
    workdir=None,
) -> CompareResult:
    """Compress ``model`` by every method and measure each result on one calibration set.

    Args:
        model: path of an ``.onnx`` file or an ``onnx.ModelProto``.
        tols: weight bounds for dehm, svd and pruning (one row per method and tol).
        methods: which of ``METHODS`` to run (rows keep ``METHODS`` order).
        calibration, input_shapes, input_ranges, num_samples, seed: the calibration set,
            as for ``dehm_onnx.verify`` (generated from the input signature by default).
        config: optimize options shared by dehm, svd and pruning (``tol`` is overridden).
        rounds: timed latency rounds.
        workdir: folder to keep every method's model in; default a temporary folder,
            removed on return.

    Returns:
        CompareResult. A method that fails gets a row of ``None`` numbers and an entry in
        ``errors``; it never stops the others.

    Raises:
        InvalidModelError: the model cannot be read or run by onnxruntime.
        ConfigError: bad tols, methods, rounds or calibration options.
    """
    specs = plan_rows(tols, methods)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds must be a positive integer, got {rounds!r}")
    config = make_config(config)
    original = load_model(model)
    temporary = workdir is None
    folder = Path(tempfile.mkdtemp(prefix="dehm_compare_")) if temporary else Path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        source = _source_path(model, original, folder)
        calib = resolve_calibration(
            original,
            calibration,
            num_samples=num_samples or DEFAULT_NUM_SAMPLES,
            input_shapes=input_shapes,
            input_ranges=input_ranges,
            seed=seed,
        )
        config = _with_calibration(config, calib, folder)
        return _run(specs, original, source, config, folder, calib, rounds)
    finally:
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)


def _source_path(model, original: onnx.ModelProto, folder: Path) -> Path:
    if isinstance(model, onnx.ModelProto):
        path = folder / "input.onnx"
        save_model(original, path)
        return path
    return Path(model)


def _with_calibration(config: OptimizeConfig, calib, folder: Path) -> OptimizeConfig:
    """``config`` verifying dehm's output bounds on compare's own calibration set."""
    path = folder / "calibration.npz"
    with atomic_output(path) as f:
        np.savez(f, **calib.arrays)
    return make_config(config, calibration=(str(path),), input_shape=(), input_range=(), num_samples=calib.num_samples)


def _run(specs, original, source, config, folder, calib, rounds) -> CompareResult:
    result = CompareResult(calibration=calib.source)
    records = layer_records(original)
    built: dict[str, Built] = {}
    measured: dict[str, dict] = {}
    for spec in specs:
        label = spec.label
        try:
            item = build(spec, original, source, config, folder)
            out_err, layer_err, per_layer = measure_errors(source, item.path, calib, records)
            model = onnx.load(str(item.path))
            measured[label] = {
                "stored_params": stored_params(model) + item.params_delta,
                "file_bytes": file_bytes(item.path),
                "output_rel_error": out_err,
                "max_layer_error": layer_err,
                "optimize_seconds": item.seconds,
            }
        except Exception as e:  # noqa: BLE001 - a failing method is a row with a note, not a crash
            if spec.method == "original":
                raise  # the input itself cannot be run: no row can be measured
            logger.info("method %s failed", label, exc_info=True)
            result.errors[label] = _one_line(e)
            continue
        built[label] = item
        result.layer_errors[label] = per_layer
        if spec.tol is not None:
            result.certified[label] = item.certified
        result.models[label] = item.path
    first_sample = next(calib.samples())
    latency = _latency(built, first_sample, rounds, result.errors)
    for spec in specs:
        label = spec.label
        values = measured.get(label)
        row = {key: None for key in ROW_KEYS}
        row["method"] = label
        if values is not None and label not in result.errors:
            row.update(values, latency_ms=latency.get(label))
        result.rows.append(row)
    return result


def _latency(built: dict, feed: dict, rounds: int, errors: dict) -> dict:
    """Latency of every built model; one that onnxruntime cannot run gets an error note."""
    latency, failures = measure_latency({label: item.path for label, item in built.items()}, feed, rounds)
    for label, error in failures.items():
        errors[label] = f"latency: {_one_line(error)}"
    return latency


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text}"[:300]
