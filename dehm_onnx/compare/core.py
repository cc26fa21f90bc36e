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
from .measure import file_bytes, layer_records, measure_errors, measure_latency, output_summary, stock_kernels, stored_params
from .methods import ACCURACY_LEVELS, FIXED_METHODS, METHOD_ALIASES, TOL_METHODS, Built, MethodSpec, _target, build, check_dehm_options
from .pareto import pareto_flags

__all__ = [
    "ROW_KEYS",
    "JSON_KEYS",
    "METHODS",
    "PARETO_AXES",
    "PARETO_ERROR_TIES",
    "DEFAULT_TOLS",
    "DEFAULT_ROUNDS",
    "CompareResult",
    "canonical_methods",
    "compare",
    "plan_rows",
    "workdir_files",
]

logger = logging.getLogger(__name__)

# The keys of every row, in table order (the --json contract).
ROW_KEYS = (
    "method",
    "stored_params",
    "file_bytes",
    "file_ratio",
    "output_rel_error",
    "output_max_abs",
    "output_cosine",
    "max_layer_error",
    "latency_ms",
    "optimize_seconds",
    "pareto",
)
METHODS = ("original",) + TOL_METHODS + FIXED_METHODS
# A row's ``pareto`` flag: no other row has at most its file bytes and at most its error,
# and less of one (``pareto.pareto_flags``). Output errors within 1 % plus 1e-6 of each other
# count as equal: the same weights run by standard ops and by the compiled kernel differ by
# float rounding (a float32 model's output rounding is ~1e-7..1e-6 relative), which must not
# decide the front.
PARETO_AXES = ("file_bytes", "output_rel_error")
PARETO_ERROR_TIES = (1e-2, 1e-6)
DEFAULT_TOLS = (1e-3, 1e-2)
DEFAULT_ROUNDS = 21


@dataclass
class CompareResult:
    """Rows (dicts with exactly ``ROW_KEYS``), failures, and per-method details.

    Attributes:
        rows: one dict per method (and tol, and variant), in ``METHODS`` order.
        errors: row ``method`` -> one-line error for methods that failed (numbers are None).
        layer_errors: row ``method`` -> {layer name: measured isolated relative error}.
        certified: row ``method`` -> {layer name: certified relative weight error}
            (dehm, svd, pruning; layers left dense are absent).
        outputs: row ``method`` -> [{"name", "rel_l2", "max_abs", "cosine"} per graph output].
        kernels: row ``method`` -> what stock onnxruntime runs for its products
            (``measure.stock_kernels``).
        models: row ``method`` -> model file (inside ``workdir``; gone if it was temporary).
        calibration: description of the calibration set.
    """

    rows: list = field(default_factory=list)
    errors: dict = field(default_factory=dict)
    layer_errors: dict = field(default_factory=dict)
    certified: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    kernels: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)
    calibration: str = ""

    def row(self, method: str) -> dict:
        """The row whose ``method`` is ``method``."""
        for row in self.rows:
            if row["method"] == method:
                return row
        raise KeyError(method)

    def to_dict(self) -> dict:
        """The JSON document (see ``JSON_KEYS``): rows, per-output errors, kernels, errors."""
        out = {
            "rows": [{k: _json_number(row[k]) for k in ROW_KEYS} for row in self.rows],
            "pareto_axes": list(PARETO_AXES),
            "pareto_error_ties": list(PARETO_ERROR_TIES),
            "outputs": {label: [{k: _json_number(v) for k, v in o.items()} for o in outs] for label, outs in self.outputs.items()},
            "kernels": dict(self.kernels),
        }
        if self.errors:
            out["errors"] = dict(self.errors)
        return out


# Top-level keys of ``CompareResult.to_dict`` (``errors`` only when a method failed).
JSON_KEYS = ("rows", "pareto_axes", "pareto_error_ties", "outputs", "kernels", "errors")


def _json_number(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _one_of(values, default=(None,)) -> list:
    """``values`` without repeats, in order; ``default`` when empty or None."""
    values = list(dict.fromkeys(values or ()))
    return values or list(default)


def _check_accuracy_levels(levels: list) -> None:
    for level in levels:
        if level is not None and (isinstance(level, bool) or level not in ACCURACY_LEVELS):
            raise ConfigError(f"accuracy_level must be one of {list(ACCURACY_LEVELS)} (or unset), got {level!r}")


def canonical_methods(methods) -> list:
    """``methods`` with old names replaced (``int4`` -> ``nbits4``), without repeats.

    Raises:
        ConfigError: an unknown method.
    """
    methods = list(dict.fromkeys(METHOD_ALIASES.get(m, m) for m in methods))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    return methods


def _dehm_pairs(precisions, emits) -> list[tuple]:
    """The (precision, emit) pairs of the dehm rows: every value must be known to optimize;
    pairs it refuses together are left out, unless that leaves none."""
    for precision in precisions:
        check_dehm_options(MethodSpec("dehm", precision=precision).dehm_overrides())
    for emit in emits:
        check_dehm_options(MethodSpec("dehm", emit=emit).dehm_overrides())
    pairs, refused = [], None
    for precision in precisions:
        for emit in emits:
            try:
                check_dehm_options(MethodSpec("dehm", precision=precision, emit=emit).dehm_overrides())
            except ConfigError as e:
                refused = e
                continue
            pairs.append((precision, emit))
    if not pairs:
        raise refused
    return pairs


def plan_rows(tols, methods, precisions=None, emits=None, accuracy_levels=None) -> list:
    """The ``MethodSpec`` of every row.

    Certified methods get one row per tol; dehm one per tol, precision and emit mode;
    the MatMulNBits methods one per accuracy level; the others one. ``None`` (or an empty
    list) for ``precisions``/``emits``/``accuracy_levels`` means the default only
    (optimize's precision, the shared config's emit, the quantizer's unset level), and
    those rows keep plain labels (``dehm@1e-02``, ``nbits8``).

    Raises:
        ConfigError: an unknown method, no tol for a certified method, a tol outside (0, 1),
            a dehm precision or emit this build's optimize does not have, or an accuracy
            level outside 0..4.
    """
    methods = canonical_methods(methods)
    tols = [float(t) for t in tols]
    for tol in tols:
        if not 0.0 < tol < 1.0:
            raise ConfigError(f"tol must be in (0, 1), got {tol!r}")
    if not tols and any(m in TOL_METHODS for m in methods):
        raise ConfigError(f"methods {list(TOL_METHODS)} need at least one --tol")
    precisions, emits, levels = _one_of(precisions), _one_of(emits), _one_of(accuracy_levels)
    pairs = _dehm_pairs(precisions, emits) if "dehm" in methods else []
    _check_accuracy_levels(levels)
    specs = []
    for method in METHODS:
        if method not in methods:
            continue
        if method == "dehm":
            specs += [MethodSpec(method, tol, precision=p, emit=e) for p, e in pairs for tol in tols]
        elif method in TOL_METHODS:
            specs += [MethodSpec(method, tol) for tol in tols]
        elif method.startswith("nbits"):
            specs += [MethodSpec(method, accuracy_level=level) for level in levels]
        else:
            specs.append(MethodSpec(method))
    return specs


def workdir_files(tols, methods, precisions=None, emits=None, accuracy_levels=None) -> list[str]:
    """Names of every file ``compare`` may write into its ``workdir`` for these rows."""
    specs = plan_rows(tols, methods, precisions, emits, accuracy_levels)
    models = [_target(Path(), spec).name for spec in specs if spec.method != "original"]
    models += ["input.onnx", "gemm_as_matmul.onnx"]
    return models + [f"{name}.data" for name in models] + ["calibration.npz"]


def compare(
    model,
    *,
    tols=DEFAULT_TOLS,
    methods=METHODS,
    precisions=None,
    emits=None,
    accuracy_levels=None,
    calibration=None,
    input_shapes=None,
    input_ranges=None,
    num_samples: int | None = None,
    seed: int = 0,
    config: OptimizeConfig | None = None,
    rounds: int = DEFAULT_ROUNDS,
    stock_latency: bool = False,
    workdir=None,
) -> CompareResult:
    """Compress ``model`` by every method and measure each result on one calibration set.

    Args:
        model: path of an ``.onnx`` file or an ``onnx.ModelProto``.
        tols: weight bounds for dehm, svd and pruning (one row per method and tol).
        methods: which of ``METHODS`` to run (rows keep ``METHODS`` order; ``int4`` is
            accepted for ``nbits4``).
        precisions: dehm rows at each of these ``OptimizeConfig.precision`` values
            (default: optimize's own); a value is refused while optimize has no such option.
        emits: dehm rows in each of these emission modes (default: ``config.emit``).
        accuracy_levels: MatMulNBits rows at each of these ``accuracy_level`` values
            (default: the quantizer's, attribute unset).
        calibration, input_shapes, input_ranges, num_samples, seed: the calibration set,
            as for ``dehm_onnx.verify`` (generated from the input signature by default).
        config: optimize options shared by dehm, svd and pruning (``tol`` is overridden).
        rounds: timed latency rounds.
        stock_latency: time models written with ``--emit function`` on their standard-op
            function bodies (what stock onnxruntime runs), not with the compiled kernel.
        workdir: folder to keep every method's model in; default a temporary folder,
            removed on return.

    Returns:
        CompareResult. A method that fails gets a row of ``None`` numbers and an entry in
        ``errors``; it never stops the others.

    Raises:
        InvalidModelError: the model cannot be read or run by onnxruntime.
        ConfigError: bad tols, methods, rounds or calibration options.
    """
    specs = plan_rows(tols, methods, precisions, emits, accuracy_levels)
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
        return _run(specs, original, source, config, folder, calib, rounds, stock_latency)
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


def _run(specs, original, source, config, folder, calib, rounds, stock_latency) -> CompareResult:
    result = CompareResult(calibration=calib.source)
    records = layer_records(original)
    original_bytes = file_bytes(source)
    built: dict[str, Built] = {}
    measured: dict[str, dict] = {}
    for spec in specs:
        label = spec.label
        try:
            item = build(spec, original, source, config, folder)
            outputs, layer_err, per_layer = measure_errors(source, item.path, calib, records)
            model = onnx.load(str(item.path))
            size = file_bytes(item.path)
            measured[label] = {
                "stored_params": stored_params(model) + item.params_delta,
                "file_bytes": size,
                "file_ratio": size / original_bytes,
                **output_summary(outputs),
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
        result.outputs[label] = outputs
        result.kernels[label] = stock_kernels(item.path)
        if spec.tol is not None:
            result.certified[label] = item.certified
        result.models[label] = item.path
    first_sample = next(calib.samples())
    latency = _latency(built, first_sample, rounds, result.errors, stock_latency)
    for spec in specs:
        label = spec.label
        values = measured.get(label)
        row = {key: None for key in ROW_KEYS}
        row["method"] = label
        if values is not None and label not in result.errors:
            row.update(values, latency_ms=latency.get(label))
        result.rows.append(row)
    _mark_pareto(result.rows)
    return result


def _mark_pareto(rows: list) -> None:
    """Set every row's ``pareto`` flag on ``PARETO_AXES`` (None for rows not measured)."""
    x, y = PARETO_AXES
    rel_tie, abs_tie = PARETO_ERROR_TIES
    flags = pareto_flags([(row[x], row[y]) for row in rows], rel_tie, abs_tie)
    for row, flag in zip(rows, flags):
        row["pareto"] = flag


def _latency(built: dict, feed: dict, rounds: int, errors: dict, stock: bool) -> dict:
    """Latency of every built model; one that onnxruntime cannot run gets an error note."""
    latency, failures = measure_latency({label: item.path for label, item in built.items()}, feed, rounds, stock)
    for label, error in failures.items():
        errors[label] = f"latency: {_one_line(error)}"
    return latency


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text}"[:300]
