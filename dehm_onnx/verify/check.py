"""Per-layer and model-level error checks of an optimized model against its original.

Definitions (docs/verify.md), **per calibration sample** ``s`` (one feed of the model):

* layer output error ``e_s = ||Y_orig,s - Y_opt,s||_F / ||Y_orig,s||_F``, where ``Y_orig`` is
  the layer's output in the original model and ``Y_opt`` the optimized layer's output *on the
  same input X* (the original model's input to that layer). The optimized layer is run in
  isolation (its nodes cut out of the optimized model), so upstream layers' errors do not leak
  into it; ``rel_fro_error_in_model`` is the worst ratio measured inside the full optimized
  model (upstream errors included), reported for information.
* the layer's bound holds when the **worst** sample does: ``max_s e_s <= tol_out + slack``;
  ``slack = 2 * sqrt(m) * eps`` (``m`` = the layer's input width, ``eps`` = machine epsilon of
  the output dtype) allows for the rounding difference between two float evaluations of the
  same product. The median over all samples is reported beside it.
* held-out samples: ``verify(..., held_out=k)`` treats the last ``k`` samples as held out;
  they are measured and reported (``held_out_error``) but do not decide ``ok``.
* per graph output: per-sample relative L2 errors (worst on the checked samples, worst on the
  held-out ones, median), and over all samples together ``max_abs``, ``rel_l2`` and
  ``cosine``.
* a value that is finite in the original and NaN or infinite in the optimized model makes
  that sample's error infinite; positions where the original itself is not finite are left
  out of every error.

Layers are read from the optimized model's ``dehm.layers`` metadata (``dehm_onnx.report``):
each entry names the layer's output, its activation input ``x`` and whether ``x`` enters
``Y = X @ W`` transposed, so a pair of models needs no flags to be verified and nothing is
re-derived from the original graph; a model without it is refused.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math

import numpy as np

from ..errors import BoundViolation, InvalidModelError
from ..model_io import load_model
from ..report import LAYERS_KEY, has_layers
from ..report import read_layers as _read_layer_entries
from .calibration import resolve_calibration
from .runner import expose_outputs, extract_layer_model, make_cpu_session, release_memory, run_samples

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
    """The measured output error of one compressed layer against its bound.

    ``rel_fro_error`` is the worst per-sample error over the checked samples (the ones that
    decide ``ok``), ``held_out_error`` the worst over the held-out ones (None if there were
    none), ``median_error`` the median over all, ``sample_errors`` every sample in order.
    """

    name: str
    op: str
    output: str
    shape: tuple
    tol: float | None
    tol_out: float
    rel_certified_error: float | None
    rel_fro_error: float | None = None
    held_out_error: float | None = None
    median_error: float | None = None
    rel_fro_error_in_model: float | None = None
    sample_errors: list = dataclasses.field(default_factory=list)
    slack: float = 0.0
    isolated: bool = False
    note: str = ""

    @property
    def checked(self) -> bool:
        """Whether an error was measured at all (False for layers inside subgraphs)."""
        return self.rel_fro_error is not None

    @property
    def ok(self) -> bool:
        """True unless the worst checked sample's error exceeds ``tol_out + slack``."""
        return not self.checked or self.rel_fro_error <= self.tol_out + self.slack

    def describe(self) -> str:
        """One-line summary of a violation, naming the layer and the numbers."""
        shape = "x".join(str(d) for d in self.shape) if self.shape else "?"
        return (
            f"layer {self.name!r} ({self.op}, {shape}): measured rel. error "
            f"{self.rel_fro_error:.3e} (worst sample) > tol_out {self.tol_out:.3e}"
        )

    def summary(self) -> str:
        """``layer fc1: output error worst 8.1e-04 (calibration), 9.7e-04 (held out), median 3.0e-04``."""
        if not self.checked:
            return f"layer {self.name}: not checked ({self.note})"
        held = f", {self.held_out_error:.2g} (held out)" if self.held_out_error is not None else ""
        return (f"layer {self.name}: output error worst {self.rel_fro_error:.2g} (calibration){held}, "
                f"median {self.median_error:.2g}; tol_out {self.tol_out:.2g}")


@dataclasses.dataclass
class OutputCheck:
    """End-to-end error of one graph output.

    ``worst``/``worst_held_out``/``median`` are per-sample relative L2 errors (checked
    samples / held-out samples / all); ``max_abs``, ``rel_l2`` and ``cosine`` take all samples
    together; ``non_finite`` counts values that are finite in the original only.
    """

    name: str
    max_abs: float
    rel_l2: float
    cosine: float
    worst: float = 0.0
    worst_held_out: float | None = None
    median: float = 0.0
    non_finite: int = 0

    @property
    def worst_all(self) -> float:
        """The worst per-sample error over checked and held-out samples."""
        return max(self.worst, self.worst_held_out or 0.0)


@dataclasses.dataclass
class LayerStats:
    """Calibration statistics of a layer's input, kept when ``collect_stats=True``.

    Attributes:
        inputs: all checked samples' rows X of Y = X @ W stacked (float64, rows x m) while
            there are fewer rows than columns, else their Gram matrix ``X^T X`` (m x m).
        rows: number of rows stacked in X.
        worst: the samples whose error exceeded ``SAFETY * tol_out`` (at most
            ``WORST_SAMPLES`` of them, worst first), each as ``(error, X_s)`` with ``X_s`` the
            sample's rows (float64) or, when it has at least as many rows as columns, its
            Gram matrix.
    """

    inputs: np.ndarray
    rows: int
    worst: list = dataclasses.field(default_factory=list)

    @property
    def folded(self) -> bool:
        """True when ``inputs`` is the Gram matrix (at least m rows were seen)."""
        return self.rows >= self.inputs.shape[1]

    @property
    def width(self) -> int:
        """m, the number of columns of X (rows of W)."""
        return int(self.inputs.shape[1])

    @property
    def gram(self) -> np.ndarray:
        """``X^T X`` (float64, m x m)."""
        return self.inputs if self.folded else self.inputs.T @ self.inputs

    @property
    def spectral_norm(self) -> float:
        """``||X||_2``."""
        if self.folded:
            return float(math.sqrt(max(np.linalg.eigvalsh(self.inputs)[-1], 0.0)))
        return float(np.linalg.norm(self.inputs, 2))


# Tightening looks at this many of a layer's worst samples, within this many bytes per layer;
# all layers of one verify call keep at most STATS_BYTES of statistics together (layers past
# it are tightened without statistics, proportionally to their overshoot).
WORST_SAMPLES = 8
_WORST_BYTES = 64 << 20
STATS_BYTES = 1 << 30
# Samples whose error exceeds this fraction of tol_out are kept for tightening.
SAFETY = 0.9


@dataclasses.dataclass
class VerifyResult:
    """Everything ``verify`` measured: per-layer checks, per-output errors, notes."""

    layers: list
    outputs: list
    num_samples: int
    calibration: str
    notes: list = dataclasses.field(default_factory=list)
    stats: dict = dataclasses.field(default_factory=dict, repr=False)
    held_out: int = 0
    generated: bool = False
    how: dict = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True if every checked layer holds its bound (worst checked sample)."""
        return all(layer.ok for layer in self.layers)

    @property
    def violations(self) -> list:
        """The layers whose measured error exceeds their bound."""
        return [layer for layer in self.layers if not layer.ok]

    @property
    def max_rel_l2(self) -> float:
        """The largest relative L2 error over the graph outputs (0.0 if none were compared)."""
        return max((o.rel_l2 for o in self.outputs), default=0.0)

    @property
    def worst_output(self):
        """The graph output with the largest per-sample error (checked or held out), or None."""
        return max(self.outputs, key=lambda o: o.worst_all, default=None)

    def model_error(self) -> float:
        """The worst per-sample relative L2 error over every graph output and sample."""
        worst = self.worst_output
        return 0.0 if worst is None else worst.worst_all

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
            "held_out": self.held_out,
            "calibration": self.calibration,
            "generated": self.generated,
            "inputs": dict(self.how),
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
    held = result.held_out
    rows = [("layer", "op", "shape", "tol_out", "certified", "worst", "held-out worst" if held else "", "median",
             "in-model", "status")]
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
            _fmt(layer.held_out_error) if held else "",
            _fmt(layer.median_error),
            _fmt(layer.rel_fro_error_in_model),
            status,
        ))
    checked = result.num_samples - held
    split = f"{checked} checked + {held} held out" if held else f"{checked} checked"
    lines = [f"calibration: {result.calibration}, {result.num_samples} samples ({split}); "
             "errors are per sample (worst, median)"]
    if result.generated:
        lines.append("NOTE: calibration inputs were GENERATED, not given: they need not resemble the model's real "
                     "inputs; pass --calibration FILE.npz to check on your data")
    lines += [f"input {name}: {text}" for name, text in result.how.items()]
    lines += _columns(rows)
    lines.append("")
    out_rows = [("output", "worst rel_l2", "held-out worst" if held else "", "median", "max_abs", "rel_l2 (all)",
                 "cosine")]
    out_rows += [(o.name, _fmt(o.worst), _fmt(o.worst_held_out) if held else "", _fmt(o.median), _fmt(o.max_abs),
                  _fmt(o.rel_l2), f"{o.cosine:.8f}") for o in result.outputs]
    lines += _columns(out_rows)
    lines += [f"note: layer {layer.name!r}: {layer.note}" for layer in result.layers if layer.note]
    lines += [f"note: output {o.name!r}: {o.non_finite} value(s) finite in the original are NaN/Inf in the optimized "
              "model" for o in result.outputs if o.non_finite]
    lines += [f"note: {note}" for note in result.notes]
    verdict = "all layer bounds hold" if result.ok else f"{len(result.violations)} layer bound(s) violated"
    lines.append(verdict + " (worst checked sample)")
    return "\n".join(lines)


def _columns(rows) -> list:
    keep = [i for i in range(len(rows[0])) if any(str(r[i]) for r in rows)]  # drop empty columns
    rows = [[r[i] for i in keep] for r in rows]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _model(model_or_path):
    """A ModelProto as given (the caller holds it, checked); a path read by ``model_io.load_model``."""
    return model_or_path if hasattr(model_or_path, "graph") else load_model(model_or_path)


def read_layers(model) -> list:
    """The layer records in the model's ``dehm.layers`` metadata (``dehm_onnx.report.read_layers``).

    Raises:
        InvalidModelError: no such metadata, not JSON, or a record lacks a required key.
    """
    if not has_layers(model):
        raise InvalidModelError(f"OPT has no compressed layers (no {LAYERS_KEY} metadata); was it written by "
                                "dehm_onnx optimize with at least one layer compressed?")
    layers = _read_layer_entries(model)
    if not layers:
        raise InvalidModelError(f"OPT has no compressed layers (its {LAYERS_KEY} metadata is empty)")
    return layers


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
    """How one layer is measured: its input in the original model and per-sample sums."""

    check: LayerCheck
    weight: str | None
    x_name: str | None = None
    transpose_x: bool = False
    session: object = None
    ref_sq: list = dataclasses.field(default_factory=list)
    iso_sq: list = dataclasses.field(default_factory=list)
    model_sq: list = dataclasses.field(default_factory=list)
    inputs: object = None  # stacked rows, their Gram matrix, or False once over the stats budget
    rows: int = 0
    worst: list = dataclasses.field(default_factory=list)


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


def diff_sq(ref: np.ndarray, opt: np.ndarray) -> tuple[float, float, int]:
    """``(||ref - opt||^2, ||ref||^2, non-finite count)`` over the positions where ``ref`` is finite.

    A position that is finite in ``ref`` but NaN/Inf in ``opt`` makes the difference infinite.
    """
    ref = np.asarray(ref, dtype=np.float64)
    opt = np.asarray(opt, dtype=np.float64)
    finite = np.isfinite(ref)
    if not finite.all():
        ref, opt = ref[finite], opt[finite]
    bad = int(ref.size - np.count_nonzero(np.isfinite(opt)))
    if bad:
        return math.inf, float(np.vdot(ref, ref)), bad
    d = ref - opt
    return float(np.vdot(d, d)), float(np.vdot(ref, ref)), 0


class _OutputAccumulator:
    def __init__(self, name: str):
        self.name = name
        self.max_abs = 0.0
        self.diff_sq = self.ref_sq = self.opt_sq = self.dot = 0.0
        self.errors: list = []
        self.non_finite = 0

    def add(self, ref: np.ndarray, opt: np.ndarray) -> None:
        ref = np.asarray(ref, dtype=np.float64)
        opt = np.asarray(opt, dtype=np.float64)
        if ref.shape != opt.shape:
            raise InvalidModelError(
                f"graph output {self.name!r} has shape {ref.shape} in the original, {opt.shape} optimized"
            )
        d_sq, r_sq, bad = diff_sq(ref, opt)
        self.errors.append(_ratio(d_sq, r_sq))
        self.non_finite += bad
        finite = np.isfinite(ref)
        ref, opt = (ref, opt) if finite.all() else (ref[finite], opt[finite])
        if ref.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(ref - opt))) if not bad else math.inf)
        self.diff_sq += d_sq
        self.ref_sq += r_sq
        if not bad:
            self.opt_sq += float(np.vdot(opt, opt))
            self.dot += float(np.vdot(ref, opt))

    def result(self, checked: int | None = None) -> OutputCheck:
        rel = _ratio(self.diff_sq, self.ref_sq)
        denominator = math.sqrt(self.ref_sq * self.opt_sq)
        cosine = 1.0 if denominator == 0.0 and self.diff_sq == 0.0 else (
            self.dot / denominator if denominator and not self.non_finite else 0.0
        )
        fit, held = _split(self.errors, checked)
        return OutputCheck(self.name, self.max_abs, rel, cosine, worst=max(fit, default=0.0),
                           worst_held_out=max(held) if held else None, median=_median(self.errors),
                           non_finite=self.non_finite)


def _split(values: list, checked: int | None) -> tuple[list, list]:
    checked = len(values) if checked is None else checked
    return values[:checked], values[checked:]


def _median(values: list) -> float:
    return float(np.median(values)) if values else 0.0


def _ratio(diff_sq: float, ref_sq: float) -> float:
    if diff_sq == 0.0:
        return 0.0
    if ref_sq == 0.0 or math.isinf(diff_sq):
        return math.inf
    return math.sqrt(diff_sq / ref_sq)


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


def _measure_sample(plan: _LayerPlan, ref: dict, opt: dict, opt_model, keep_stats: dict | None) -> None:
    y_ref = ref[plan.check.output]
    d_sq, r_sq, _ = diff_sq(y_ref, opt[plan.check.output])
    plan.ref_sq.append(r_sq)
    plan.model_sq.append(d_sq)
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
    iso_sq = diff_sq(y_ref, y_iso)[0]
    plan.iso_sq.append(iso_sq)
    if keep_stats is not None:
        _keep_stats(plan, x, _ratio(iso_sq, r_sq), keep_stats)


def _keep_stats(plan: _LayerPlan, x: np.ndarray, error: float, budget: dict) -> None:
    """Add the sample's rows to the layer's statistics; keep it whole if it is among the worst.

    Rows are stacked while there are fewer than m of them, then folded into a Gram matrix;
    what is kept counts against ``budget["left"]`` (bytes), shared by every layer.
    """
    if plan.inputs is False:
        return  # over budget: this layer is tightened without statistics
    rows = _rows_of(plan, x)
    if rows is None:
        return
    before = 0 if plan.inputs is None else plan.inputs.nbytes
    m = rows.shape[1]
    if plan.inputs is not None and plan.rows >= m:
        plan.inputs = plan.inputs + rows.T @ rows  # already the Gram matrix
    else:
        plan.inputs = rows if plan.inputs is None else np.concatenate([plan.inputs, rows])
        if plan.inputs.shape[0] >= m:
            plan.inputs = plan.inputs.T @ plan.inputs
    plan.rows += rows.shape[0]
    budget["left"] -= plan.inputs.nbytes - before
    if error > SAFETY * plan.check.tol_out:
        kept = rows if rows.shape[0] < m else rows.T @ rows
        plan.worst.append((error, kept))
        plan.worst.sort(key=lambda item: -item[0])
        cap = min(WORST_SAMPLES, max(1, _WORST_BYTES // max(kept.nbytes, 1)))
        dropped = plan.worst[cap:]
        del plan.worst[cap:]
        budget["left"] -= kept.nbytes - sum(d[1].nbytes for d in dropped)
    if budget["left"] < 0:
        plan.inputs, plan.worst = False, []


def _finish(plan: _LayerPlan, checked: int) -> None:
    check = plan.check
    in_model = [_ratio(d, r) for d, r in zip(plan.model_sq, plan.ref_sq)]
    check.isolated = plan.session is not None and len(plan.iso_sq) == len(plan.ref_sq)
    errors = [_ratio(d, r) for d, r in zip(plan.iso_sq, plan.ref_sq)] if check.isolated else in_model
    fit, held = _split(errors, checked)
    check.sample_errors = errors
    check.rel_fro_error = max(fit, default=0.0)
    check.held_out_error = max(held) if held else None
    check.median_error = _median(errors)
    check.rel_fro_error_in_model = max(in_model, default=0.0)


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


# Outputs of the original kept in memory at once (so its session can go before the optimized
# model's is made); beyond this, both run side by side, sample by sample.
REFERENCE_BYTES = 1 << 30


def _reference_runs(exposed, samples: list, names: list):
    """The original model's outputs on every sample: all computed first and the session
    released (its weights unmapped) when they fit ``REFERENCE_BYTES``, else a lazy iterator.

    Running the original alone first bounds peak memory by the larger of the two models, not
    their sum: for a model with external data onnxruntime maps every weight while it runs.
    """
    release_memory()
    session = make_cpu_session(exposed.model)
    exposed.model = None
    runs = run_samples(session, samples, names, "original")
    first = next(runs, None)
    if first is None:
        return iter(())
    size = sum(np.asarray(v).nbytes for v in first.values())
    if size * len(samples) > REFERENCE_BYTES:
        return itertools.chain([first], runs)
    values = [first, *runs]
    del session, runs
    return iter(values)


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
    held_out: int = 0,
) -> VerifyResult:
    """Measure every compressed layer's output error and every graph output's error, per sample.

    Args:
        orig: the original model (path or ModelProto).
        opt: the optimized model (path or ModelProto); its ``dehm.layers`` metadata names the
            layers and their bounds unless ``layers`` is given.
        calibration: None (generate from the original model's inputs), a CalibrationSet, a
            dict name -> samples array, or one or more ``.npz`` paths.
        layers: layer records (``dehm.layers`` entries) overriding the metadata.
        input_shapes: ``{name: shape}`` or ``["name=1x128", ...]`` for generated inputs.
        input_ranges: ``{name: (lo, hi)}`` or ``["name=LO:HI", ...]`` for integer inputs.
        num_samples: number of generated samples (default ``DEFAULT_NUM_SAMPLES``; must be >= 1).
        seed: seed of generated samples.
        collect_stats: also keep each layer's input rows (or Gram matrix) and worst samples
            in ``result.stats`` (checked samples only; ``STATS_BYTES`` for all layers together).
        held_out: the last ``held_out`` samples are measured and reported but do not decide
            ``ok``.

    Returns:
        VerifyResult; call ``raise_if_violated()`` to turn a failed bound into BoundViolation.

    Raises:
        InvalidModelError, ConfigError: unreadable models, no or bad ``dehm.layers``
            metadata, or bad calibration.
    """
    from ..errors import ConfigError
    from .calibration import DEFAULT_NUM_SAMPLES

    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1):
        raise ConfigError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    orig_model, opt_model = _model(orig), _model(opt)
    records = list(layers) if layers is not None else read_layers(opt_model)
    _check_same_inputs(orig_model, opt_model)
    calib = resolve_calibration(
        orig_model,
        calibration,
        num_samples=num_samples or DEFAULT_NUM_SAMPLES,
        input_shapes=input_shapes,
        input_ranges=input_ranges,
        seed=seed,
    )
    if not 0 <= held_out < calib.num_samples:
        held_out = 0
    checked = calib.num_samples - held_out
    plans = _plan_layers(orig_model, records)
    compared, notes = _compared_outputs(orig_model, opt_model)
    notes += list(calib.notes)
    ref_exposed, opt_exposed, active = _expose_layers(orig_model, opt_model, plans, notes)
    accumulators = [_OutputAccumulator(name) for name in compared]
    samples = list(calib.samples())
    ref_runs = _reference_runs(ref_exposed, samples, _unique(compared + ref_exposed.exposed))
    opt_names = _unique(compared + opt_exposed.exposed)
    opt_session = make_cpu_session(opt_exposed.model)
    opt_exposed.model = None  # onnxruntime holds its own copy
    opt_runs = run_samples(opt_session, samples, opt_names, "optimized")
    budget = {"left": STATS_BYTES}
    for index, (ref, opt_values) in enumerate(zip(ref_runs, opt_runs)):
        for acc in accumulators:
            acc.add(ref[acc.name], opt_values[acc.name])
        for plan in active:
            _measure_sample(plan, ref, opt_values, opt_model, budget if collect_stats and index < checked else None)
    for plan in active:
        _finish(plan, checked)
    stats = {p.check.name: LayerStats(p.inputs, p.rows, p.worst) for p in active
             if p.inputs is not None and p.inputs is not False}
    result = VerifyResult(
        layers=[p.check for p in plans],
        outputs=[acc.result(checked) for acc in accumulators],
        num_samples=calib.num_samples,
        calibration=calib.source,
        notes=notes,
        stats=stats,
        held_out=held_out,
        generated=calib.generated,
        how=dict(calib.how),
    )
    for layer in result.violations:
        logger.info("bound violated: %s", layer.describe())
    return result
