"""Per-layer and model-level error checks of an optimized model against its original.

Definitions (docs/verify.md), all over the whole calibration set at once:

* layer output error ``rel_fro_error = ||Y_orig - Y_opt||_F / ||Y_orig||_F``, where ``Y_orig``
  is the layer's output in the original model and ``Y_opt`` the optimized layer's output *on
  the same input X* (the original model's input to that layer). The optimized layer is run in
  isolation (its nodes cut out of the optimized model), so upstream layers' errors do not leak
  into it; ``rel_fro_error_in_model`` is the same ratio measured inside the full optimized
  model (upstream errors included), reported for information.
* the bound holds when ``rel_fro_error <= tol_out + slack``; ``slack = 2 * sqrt(m) * eps``
  (``m`` = the layer's input width, ``eps`` = machine epsilon of the output dtype) allows for
  the rounding difference between two float evaluations of the same product.
* per graph output: ``max_abs = max|Y_orig - Y_opt|``, ``rel_l2 = ||Y_orig - Y_opt||_2 /
  ||Y_orig||_2`` and ``cosine = <Y_orig, Y_opt> / (||Y_orig|| ||Y_opt||)``.

Layers are read from the optimized model's ``dehm.layers`` metadata (``dehm_onnx.report``):
each entry names the layer's output, its activation input ``x`` and whether ``x`` enters
``Y = X @ W`` transposed, so a pair of models needs no flags to be verified and nothing is
re-derived from the original graph.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import numpy as np

from ..errors import BoundViolation, InvalidModelError
from ..model_io import load_model
from ..report import LAYERS_KEY, has_layers
from ..report import read_layers as _read_layer_entries
from .calibration import resolve_calibration
from .runner import expose_outputs, extract_layer_model, make_cpu_session, run_samples

__all__ = [
    "LAYERS_KEY",
    "LayerCheck",
    "LayerStats",
    "OutputCheck",
    "VerifyResult",
    "read_layers",
    "verify",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LayerCheck:
    """The measured output error of one compressed layer against its bound."""

    name: str
    op: str
    output: str
    shape: tuple
    tol: float | None
    tol_out: float
    rel_certified_error: float | None
    rel_fro_error: float | None = None
    rel_fro_error_in_model: float | None = None
    slack: float = 0.0
    isolated: bool = False
    note: str = ""

    @property
    def checked(self) -> bool:
        """Whether an error was measured at all (False for layers inside subgraphs)."""
        return self.rel_fro_error is not None

    @property
    def ok(self) -> bool:
        """True unless a measured error exceeds ``tol_out + slack``."""
        return not self.checked or self.rel_fro_error <= self.tol_out + self.slack

    def describe(self) -> str:
        """One-line summary of a violation, naming the layer and the numbers."""
        shape = "x".join(str(d) for d in self.shape) if self.shape else "?"
        return (
            f"layer {self.name!r} ({self.op}, {shape}): measured rel. error "
            f"{self.rel_fro_error:.3e} > tol_out {self.tol_out:.3e}"
        )


@dataclasses.dataclass
class OutputCheck:
    """End-to-end error of one graph output over the calibration set."""

    name: str
    max_abs: float
    rel_l2: float
    cosine: float


@dataclasses.dataclass
class LayerStats:
    """Calibration statistics of a layer's input, kept when ``collect_stats=True``.

    Attributes:
        gram: ``X^T X`` (float64, m x m) of all calibration rows X of Y = X @ W.
        rows: number of rows stacked in X.
    """

    gram: np.ndarray
    rows: int

    @property
    def spectral_norm(self) -> float:
        """``||X||_2``, from the largest eigenvalue of the Gram matrix."""
        return float(math.sqrt(max(np.linalg.eigvalsh(self.gram)[-1], 0.0)))


@dataclasses.dataclass
class VerifyResult:
    """Everything ``verify`` measured: per-layer checks, per-output errors, notes."""

    layers: list
    outputs: list
    num_samples: int
    calibration: str
    notes: list = dataclasses.field(default_factory=list)
    stats: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        """True if every checked layer holds its bound."""
        return all(layer.ok for layer in self.layers)

    @property
    def violations(self) -> list:
        """The layers whose measured error exceeds their bound."""
        return [layer for layer in self.layers if not layer.ok]

    @property
    def max_rel_l2(self) -> float:
        """The largest relative L2 error over the graph outputs (0.0 if none were compared)."""
        return max((o.rel_l2 for o in self.outputs), default=0.0)

    def message(self) -> str:
        """One line naming every violated layer and its numbers."""
        return "; ".join(layer.describe() for layer in self.violations)

    def raise_if_violated(self) -> None:
        """Raise BoundViolation (carrying the offending LayerChecks) if any bound fails."""
        if not self.ok:
            raise BoundViolation(self.message(), self.violations)

    def to_dict(self) -> dict:
        """A JSON-ready dict (the ``--report`` file)."""
        return {
            "ok": self.ok,
            "num_samples": self.num_samples,
            "calibration": self.calibration,
            "layers": [
                {**dataclasses.asdict(layer), "shape": list(layer.shape), "ok": layer.ok}
                for layer in self.layers
            ],
            "outputs": [dataclasses.asdict(o) for o in self.outputs],
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        """``to_dict`` as indented JSON (non-finite numbers as strings)."""
        return json.dumps(_finite(self.to_dict()), indent=2)

    def table(self) -> str:
        """A plain-text table of layers and outputs for the terminal."""
        return _format_table(self)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2e}"


def _format_table(result: VerifyResult) -> str:
    rows = [("layer", "op", "shape", "tol_out", "certified", "measured", "in-model", "status")]
    for layer in result.layers:
        status = "ok" if layer.ok else "VIOLATED"
        if not layer.checked:
            status = "not checked"
        rows.append((
            layer.name,
            layer.op,
            "x".join(str(d) for d in layer.shape) or "?",
            _fmt(layer.tol_out),
            _fmt(layer.rel_certified_error),
            _fmt(layer.rel_fro_error),
            _fmt(layer.rel_fro_error_in_model),
            status,
        ))
    lines = [f"calibration: {result.calibration}, {result.num_samples} samples", *_columns(rows), ""]
    out_rows = [("output", "max_abs", "rel_l2", "cosine")]
    out_rows += [(o.name, _fmt(o.max_abs), _fmt(o.rel_l2), f"{o.cosine:.8f}") for o in result.outputs]
    lines += _columns(out_rows)
    lines += [f"note: layer {layer.name!r}: {layer.note}" for layer in result.layers if layer.note]
    lines += [f"note: {note}" for note in result.notes]
    verdict = "all layer bounds hold" if result.ok else f"{len(result.violations)} layer bound(s) violated"
    lines.append(verdict)
    return "\n".join(lines)


def _columns(rows) -> list:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _model(model_or_path):
    """A ModelProto as given (the caller holds it, checked); a path read by ``model_io.load_model``."""
    return model_or_path if hasattr(model_or_path, "graph") else load_model(model_or_path)


def _unchanged(orig, opt) -> bool:
    """True when the optimized model has no dehm metadata and the same graph as the original."""
    return not has_layers(opt) and orig.graph.SerializeToString() == opt.graph.SerializeToString()


def read_layers(model) -> list:
    """The layer records in the model's ``dehm.layers`` metadata (``dehm_onnx.report.read_layers``).

    Raises:
        InvalidModelError: no such metadata, not JSON, or a record lacks a required key.
    """
    if not has_layers(model):
        raise InvalidModelError(
            f"the optimized model has no {LAYERS_KEY!r} metadata; was it written by dehm_onnx optimize?"
        )
    return _read_layer_entries(model)


def _new_check(record: dict) -> LayerCheck:
    tol = record.get("tol")
    tol_out = record["tol_out"] if record.get("tol_out") is not None else tol  # layers= may be hand-written
    return LayerCheck(
        name=str(record["name"]),
        op=str(record.get("op", "?")),
        output=str(record["output"]),
        shape=tuple(record.get("shape") or ()),
        tol=None if tol is None else float(tol),
        tol_out=float(tol_out),
        rel_certified_error=None if record.get("rel_certified_error") is None else float(record["rel_certified_error"]),
    )


@dataclasses.dataclass
class _LayerPlan:
    """How one layer is measured: its input in the original model and accumulators."""

    check: LayerCheck
    weight: str | None
    x_name: str | None = None
    transpose_x: bool = False
    session: object = None
    ref_sq: float = 0.0
    iso_sq: float = 0.0
    model_sq: float = 0.0
    gram: np.ndarray | None = None
    rows: int = 0


def _plan_layers(orig, records: list) -> list:
    """One plan per record: its input is the record's ``x`` (in the original model), entering
    ``X @ W`` transposed when ``x_transposed``; a record without ``x`` is measured in-model only."""
    produced = {out for node in orig.graph.node for out in node.output if out}
    plans = []
    for record in records:
        plan = _LayerPlan(_new_check(record), record.get("weight"))
        if plan.check.output not in produced:
            plan.check.note = "output not produced in the original model's main graph"
        elif record.get("x"):
            plan.x_name, plan.transpose_x = str(record["x"]), bool(record.get("x_transposed", False))
        else:
            plan.check.note = "the record names no activation input (x); measured in-model only"
        plans.append(plan)
    return plans


def _input_names(model) -> list:
    initializers = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


def _check_same_inputs(orig, opt) -> None:
    a, b = _input_names(orig), _input_names(opt)
    if sorted(a) != sorted(b):
        raise InvalidModelError(f"the models have different inputs: original {a}, optimized {b}")


class _OutputAccumulator:
    def __init__(self, name: str):
        self.name = name
        self.max_abs = 0.0
        self.diff_sq = self.ref_sq = self.opt_sq = self.dot = 0.0

    def add(self, ref: np.ndarray, opt: np.ndarray) -> None:
        ref = np.asarray(ref, dtype=np.float64)
        opt = np.asarray(opt, dtype=np.float64)
        if ref.shape != opt.shape:
            raise InvalidModelError(
                f"graph output {self.name!r} has shape {ref.shape} in the original, {opt.shape} optimized"
            )
        diff = ref - opt
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(diff))))
        self.diff_sq += float(np.vdot(diff, diff))
        self.ref_sq += float(np.vdot(ref, ref))
        self.opt_sq += float(np.vdot(opt, opt))
        self.dot += float(np.vdot(ref, opt))

    def result(self) -> OutputCheck:
        rel = _ratio(self.diff_sq, self.ref_sq)
        denominator = math.sqrt(self.ref_sq * self.opt_sq)
        cosine = 1.0 if denominator == 0.0 and self.diff_sq == 0.0 else (
            self.dot / denominator if denominator else 0.0
        )
        return OutputCheck(self.name, self.max_abs, rel, cosine)


def _ratio(diff_sq: float, ref_sq: float) -> float:
    if ref_sq == 0.0:
        return 0.0 if diff_sq == 0.0 else math.inf
    return math.sqrt(diff_sq / ref_sq)


def _sq(a: np.ndarray, b: np.ndarray | None = None) -> float:
    d = np.asarray(a, dtype=np.float64) if b is None else np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return float(np.vdot(d, d))


def _rows_of(plan: _LayerPlan, x: np.ndarray) -> np.ndarray | None:
    if plan.transpose_x and x.ndim >= 2:
        x = np.swapaxes(x, -1, -2)
    width = plan.check.shape[0] if plan.check.shape else None
    if x is None or x.ndim == 0 or (width is not None and x.shape[-1] != width):
        return None
    return x.reshape(-1, x.shape[-1]).astype(np.float64)


def _slack(plan: _LayerPlan, y: np.ndarray) -> float:
    if y.dtype.kind != "f":
        return 0.0
    width = plan.check.shape[0] if plan.check.shape else 1
    return 2.0 * math.sqrt(max(int(width), 1)) * float(np.finfo(y.dtype).eps)


def _measure_sample(plan: _LayerPlan, ref: dict, opt: dict, opt_model, collect_stats: bool) -> None:
    y_ref = ref[plan.check.output]
    plan.ref_sq += _sq(y_ref)
    plan.model_sq += _sq(y_ref, opt[plan.check.output])
    plan.check.slack = _slack(plan, y_ref)
    if plan.x_name is None:
        return
    x = ref[plan.x_name]
    if plan.session is None:
        layer_model = extract_layer_model(opt_model, plan.x_name, plan.check.output, x.dtype)
        if layer_model is None:
            plan.x_name = None
            plan.check.note = "optimized layer depends on more than its input; measured in-model only"
            return
        plan.session = make_cpu_session(layer_model)
    y_iso = plan.session.run([plan.check.output], {plan.x_name: x})[0]
    plan.iso_sq += _sq(y_ref, y_iso)
    if collect_stats:
        rows = _rows_of(plan, x)
        if rows is not None:
            plan.gram = rows.T @ rows if plan.gram is None else plan.gram + rows.T @ rows
            plan.rows += rows.shape[0]


def _finish(plan: _LayerPlan) -> None:
    check = plan.check
    check.rel_fro_error_in_model = _ratio(plan.model_sq, plan.ref_sq)
    check.isolated = plan.session is not None
    check.rel_fro_error = _ratio(plan.iso_sq, plan.ref_sq) if check.isolated else check.rel_fro_error_in_model


def _unique(names: list) -> list:
    return list(dict.fromkeys(names))


def _compared_outputs(orig_model, opt_model) -> tuple[list, list]:
    """Graph outputs present in both models, and a note for each one the optimized model lacks."""
    graph_outputs = [o.name for o in orig_model.graph.output]
    opt_outputs = {o.name for o in opt_model.graph.output}
    compared = [name for name in graph_outputs if name in opt_outputs]
    notes = [f"graph output {n!r} is missing from the optimized model" for n in graph_outputs if n not in opt_outputs]
    return compared, notes


def _expose_layers(orig_model, opt_model, plans: list, notes: list):
    """Expose layer outputs (both models) and inputs (original); return the plans measurable."""
    layer_names = [p.check.output for p in plans]
    ref_exposed = expose_outputs(orig_model, layer_names + [p.x_name for p in plans if p.x_name])
    opt_exposed = expose_outputs(opt_model, layer_names)
    notes += ref_exposed.notes + [n for n in opt_exposed.notes if n not in ref_exposed.notes]
    measurable = set(ref_exposed.exposed) & set(opt_exposed.exposed)
    for plan in plans:
        if plan.check.output not in measurable:
            plan.x_name = None
            plan.check.note = plan.check.note or "output not exposed in both models; not checked"
        elif plan.x_name is not None and plan.x_name not in ref_exposed.exposed:
            plan.x_name = None
    return ref_exposed, opt_exposed, [p for p in plans if p.check.output in measurable]


def verify(
    orig,
    opt,
    calibration=None,
    *,
    layers=None,
    input_shapes=None,
    input_ranges=None,
    num_samples: int | None = None,
    seed: int = 0,
    collect_stats: bool = False,
) -> VerifyResult:
    """Measure every compressed layer's output error and every graph output's error.

    Args:
        orig: the original model (path or ModelProto).
        opt: the optimized model (path or ModelProto); its ``dehm.layers`` metadata names the
            layers and their bounds unless ``layers`` is given.
        calibration: None (generate from the original model's inputs), a CalibrationSet, a
            dict name -> samples array, or one or more ``.npz`` paths.
        layers: layer records (``dehm.layers`` entries) overriding the metadata.
        input_shapes: ``{name: shape}`` or ``["name=1x128", ...]`` for generated inputs.
        input_ranges: ``{name: (lo, hi)}`` or ``["name=LO:HI", ...]`` for integer inputs.
        num_samples: number of generated samples (default ``DEFAULT_NUM_SAMPLES``).
        seed: seed of generated samples.
        collect_stats: also keep each layer's input Gram matrix in ``result.stats``.

    Returns:
        VerifyResult; call ``raise_if_violated()`` to turn a failed bound into BoundViolation.

    Raises:
        InvalidModelError, ConfigError: unreadable models, bad metadata or bad calibration.
    """
    from .calibration import DEFAULT_NUM_SAMPLES

    orig_model, opt_model = _model(orig), _model(opt)
    if layers is not None:
        records = list(layers)
    elif _unchanged(orig_model, opt_model):
        records = []  # optimize compressed nothing and left the model as it was
    else:
        records = read_layers(opt_model)
    _check_same_inputs(orig_model, opt_model)
    calib = resolve_calibration(
        orig_model,
        calibration,
        num_samples=num_samples or DEFAULT_NUM_SAMPLES,
        input_shapes=input_shapes,
        input_ranges=input_ranges,
        seed=seed,
    )
    plans = _plan_layers(orig_model, records)
    compared, notes = _compared_outputs(orig_model, opt_model)
    ref_exposed, opt_exposed, active = _expose_layers(orig_model, opt_model, plans, notes)
    accumulators = [_OutputAccumulator(name) for name in compared]
    samples = list(calib.samples())
    ref_runs = run_samples(make_cpu_session(ref_exposed.model), samples, _unique(compared + ref_exposed.exposed), "original")
    opt_runs = run_samples(make_cpu_session(opt_exposed.model), samples, _unique(compared + opt_exposed.exposed), "optimized")
    for ref, opt_values in zip(ref_runs, opt_runs):
        for acc in accumulators:
            acc.add(ref[acc.name], opt_values[acc.name])
        for plan in active:
            _measure_sample(plan, ref, opt_values, opt_model, collect_stats)
    for plan in active:
        _finish(plan)
    stats = {p.check.name: LayerStats(p.gram, p.rows) for p in active if p.gram is not None}
    result = VerifyResult(
        layers=[p.check for p in plans],
        outputs=[acc.result() for acc in accumulators],
        num_samples=calib.num_samples,
        calibration=calib.source,
        notes=notes,
        stats=stats,
    )
    for layer in result.violations:
        logger.info("bound violated: %s", layer.describe())
    return result
