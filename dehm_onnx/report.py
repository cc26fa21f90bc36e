"""What the optimize pass did, layer by layer: ``LayerRecord`` and ``Report``.

A ``LayerRecord`` describes one candidate MatMul/Gemm node, compressed or skipped (with the
reason as a sentence). ``Report`` adds model totals and renders as a table or JSON.
The ``dehm.layers`` model metadata (``LAYERS_KEY``; one ``metadata_entry`` per compressed
layer, ``read_layers``/``write_layers``) is the part of a compressed record that other
tools, ``dehm_onnx.verify`` first, read back from the optimized model: it says what each
layer's bound is, which tensor is its activation input and in which orientation it enters
``Y = X @ W``, and which emission was written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, MutableMapping
from dataclasses import asdict, dataclass, field

from .errors import InvalidModelError

__all__ = [
    "LayerRecord",
    "Report",
    "METADATA_KEYS",
    "LAYERS_KEY",
    "VERSION_KEY",
    "has_layers",
    "read_layers",
    "write_layers",
]

LAYERS_KEY = "dehm.layers"
VERSION_KEY = "dehm.version"
# Keys of one entry of the ``dehm.layers`` model metadata.
METADATA_KEYS = (
    "name",
    "op",
    "output",
    "weight",
    "source",
    "shape",
    "x",
    "x_transposed",
    "tol",
    "tol_out",
    "rel_certified_error",
    "params",
    "dense_params",
    "emit",
)
_REQUIRED_KEYS = ("name", "output")


@dataclass
class LayerRecord:
    """One MatMul/Gemm candidate and what happened to it.

    Attributes:
        name: node name (generated as ``Op(output)`` when the node has none).
        op: ``"MatMul"`` or ``"Gemm"``.
        output: the node's output tensor name (kept by the rewrite).
        weight: name of the stored weight tensor.
        source: where the weight comes from (``"initializer"``, ``"constant"``,
            ``"dequantize int8 per-axis"``, ``"transpose(initializer)"``, ...); the bound
            is against the float weight that source computes.
        x: the activation input (tensor name) of the original node.
        x_transposed: whether ``x`` enters ``Y = X @ W`` with its last two axes swapped
            (``MatMul(W, X)``, Gemm with ``transA`` or with the weight in A).
        graph: ``"main"`` or the path of the subgraph holding the node.
        weight_graph: the same for the graph that defines the weight (outer scope or own).
        shape: ``[m, n]`` of W in the ``Y = X @ W`` orientation.
        compressed: whether the node was replaced.
        skip_reason: ``SkipReason`` name when skipped, else ``None``.
        reason: the skip reason as a sentence.
        tol: weight bound used (relative Frobenius).
        tol_out: layer-output bound (defaults to ``tol``; checked by ``dehm_onnx.verify``).
        rel_certified_error: relative ``||W - W_H||_F / ||W||_F`` certified by construction
            (``HMatrix.certified_error`` is the absolute one).
        params, dense_params: stored scalars after / before.
        bytes_before, bytes_after: bytes of the weight as stored in the input (its tensor and
            the constants its source chain reads) / of the tensors the compressed layer stores
            (a shared weight's are counted at its first user, 0 at the others).
        precision: the blocks by kind and storage, e.g. ``lr float+fp16 x283, dense fp16 x256``.
        blocks: block count per kind (``zero``/``dense``/``lowrank``).
        max_rank: largest rank of a low-rank block.
        permuted: whether a row or column permutation is used.
        emit: emission mode actually written (``ops`` where HMatMul cannot take the dtype).
        family: the nodes written: ``batched`` (stacked factors, few nodes), ``blocks`` (a
            product per block) or the node of the ``function``/``custom`` modes.
        nodes: number of ONNX nodes that replace the layer.
        measured_error: relative output error measured on calibration data, if verified.
    """

    name: str
    op: str
    output: str
    weight: str
    source: str = "initializer"
    x: str = ""
    x_transposed: bool = False
    graph: str = "main"
    weight_graph: str = "main"
    shape: list[int] = field(default_factory=list)
    compressed: bool = False
    skip_reason: str | None = None
    reason: str | None = None
    tol: float | None = None
    tol_out: float | None = None
    rel_certified_error: float | None = None
    params: int | None = None
    dense_params: int | None = None
    bytes_before: int | None = None
    bytes_after: int | None = None
    precision: str | None = None
    blocks: dict[str, int] = field(default_factory=dict)
    max_rank: int = 0
    permuted: bool = False
    emit: str | None = None
    family: str | None = None
    nodes: int = 0
    measured_error: float | None = None

    @property
    def ratio(self) -> float | None:
        """Stored / dense parameters (``None`` when not compressed)."""
        if not self.compressed or not self.dense_params:
            return None
        return self.params / self.dense_params

    @property
    def byte_ratio(self) -> float | None:
        """Bytes after / before (``None`` when not compressed or unknown)."""
        if not self.compressed or not self.bytes_before or self.bytes_after is None:
            return None
        return self.bytes_after / self.bytes_before

    def metadata_entry(self) -> dict:
        """The ``dehm.layers`` entry of a compressed layer."""
        assert self.compressed, f"Bug: layer {self.name!r} was not compressed"
        assert self.tol_out is not None, f"Bug: layer {self.name!r} has no output bound"
        return {key: getattr(self, key) for key in METADATA_KEYS}

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ratio"] = self.ratio
        out["byte_ratio"] = self.byte_ratio
        return out


@dataclass
class Report:
    """Per-layer records plus model totals.

    ``params_before``/``params_after`` count the scalars of every candidate weight (skipped
    ones count on both sides); ``bytes_before``/``bytes_after`` are serialized model sizes.
    """

    layers: list[LayerRecord] = field(default_factory=list)
    tol: float | None = None
    emit: str | None = None
    bytes_before: int | None = None
    bytes_after: int | None = None
    version: str = ""
    # Set by dehm_onnx.verify.tighten: {"performed": False, "reason": ...} or the measured results.
    verification: dict | None = None
    # Model-local functions inlined to reach the weights passed into them (domain::name).
    inlined_functions: list[str] = field(default_factory=list)
    # Sentences about the input the user should know, e.g. checker defects that were tolerated.
    notes: list[str] = field(default_factory=list)

    @property
    def compressed(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.compressed]

    @property
    def skipped(self) -> list[LayerRecord]:
        return [r for r in self.layers if not r.compressed]

    @property
    def params_before(self) -> int:
        return sum(_dense_count(r) for r in _unique_weights(self.layers))

    @property
    def params_after(self) -> int:
        return sum(r.params if r.compressed else _dense_count(r) for r in _unique_weights(self.layers))

    @property
    def weight_bytes_before(self) -> int:
        """Bytes of the compressed layers' weights as stored in the input (each weight once)."""
        return sum(r.bytes_before or 0 for r in _unique_weights(self.compressed))

    @property
    def weight_bytes_after(self) -> int:
        """Bytes the compressed layers store instead."""
        return sum(r.bytes_after or 0 for r in self.compressed)

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "tol": self.tol,
            "emit": self.emit,
            "totals": {
                "layers": len(self.layers),
                "compressed": len(self.compressed),
                "skipped": len(self.skipped),
                "params_before": self.params_before,
                "params_after": self.params_after,
                "weight_bytes_before": self.weight_bytes_before,
                "weight_bytes_after": self.weight_bytes_after,
                "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after,
            },
            "layers": [r.to_dict() for r in self.layers],
            "inlined_functions": list(self.inlined_functions),
            "verification": self.verification,
            "notes": list(self.notes),
        }

    def to_json(self, indent: int = 2) -> str:
        """The report as JSON (layers in graph order, totals apart)."""
        return json.dumps(self.to_dict(), indent=indent)

    def to_table(self) -> str:
        """A fixed-width table, one row per layer, then the totals."""
        header = ("layer", "op", "shape", "blocks z/d/lr", "rank", "perm", "bytes", "ratio", "precision", "cert.err", "status")
        rows = [header] + [_row(r) for r in self.layers]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append("")
        lines.append(self._totals_line())
        if self.inlined_functions:
            lines.append(f"inlined model-local functions (to reach their weights): {', '.join(self.inlined_functions)}")
        if self.verification is not None:
            lines.append(_verification_line(self.verification))
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)

    def _totals_line(self) -> str:
        before, after = self.weight_bytes_before, self.weight_bytes_after
        ratio = f" ({after / before:.3f}x)" if before else ""
        text = (
            f"{len(self.compressed)} of {len(self.layers)} layers compressed at {_tols_used(self)}; "
            f"their weight bytes {before} -> {after}{ratio}"
        )
        if self.bytes_before is not None and self.bytes_after is not None:
            file_ratio = f" ({self.bytes_after / self.bytes_before:.3f}x)" if self.bytes_before else ""
            text += f"; file bytes {self.bytes_before} -> {self.bytes_after}{file_ratio}"
        return text


def _tols_used(report: Report) -> str:
    """``tol=1.00e-03``, or the range of per-layer tols actually used when they differ."""
    tols = sorted({r.tol for r in report.compressed if r.tol is not None})
    if not tols:
        return f"tol={_num(report.tol)}"
    if len(tols) == 1:
        return f"tol={_num(tols[0])}"
    return f"per-layer tol {_num(tols[0])}..{_num(tols[-1])}"


def _verification_line(v: dict) -> str:
    if not v.get("performed"):
        return f"verification: not performed, {v.get('reason', '')}"
    if v.get("unreachable"):
        return f"verification: {v['unreachable']}; every layer left dense"
    lines = []
    if v.get("generated"):
        lines.append("WARNING: calibration inputs were GENERATED, not given (" + "; ".join(
            f"{name}: {how}" for name, how in (v.get("inputs") or {}).items())
            + "). They need not resemble the model's real inputs; pass --calibration FILE.npz to verify on your data.")
    held = v.get("held_out") or 0
    checked = (v.get("num_samples") or 0) - held
    text = (
        f"verification: every compressed layer's output error <= tol_out={_num(v.get('tol_out'))} on each of "
        f"{checked} calibration samples ({v.get('calibration')}); {held} more held out, reported only"
    )
    if v.get("model_tol") is not None:
        text += f"; every graph output's error <= {_num(v['model_tol'])} on all {v.get('num_samples')} samples"
    if v.get("tightened"):
        text += f"; {len(v['tightened'])} tightening step(s)"
    if v.get("left_dense"):
        text += f"; left dense: {', '.join(v['left_dense'])}"
    allocation = v.get("allocation")
    if allocation:
        text += f"; max_model_error {allocation['target']:.2e}: shared tol {_num(allocation['tol'])}"
    lines.append(text)
    lines += list(v.get("summary") or [])
    return "\n".join(lines)


def _dense_count(record: LayerRecord) -> int:
    if record.dense_params is not None:
        return record.dense_params
    return record.shape[0] * record.shape[1] if len(record.shape) == 2 else 0


def _unique_weights(records: list[LayerRecord]) -> list[LayerRecord]:
    # A shared weight is stored (and compressed) once, so it counts once in the totals.
    seen, out = set(), []
    for r in records:
        key = (r.weight_graph, r.weight, r.compressed)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def _row(r: LayerRecord) -> tuple[str, ...]:
    shape = "x".join(str(s) for s in r.shape) or "?"
    if r.compressed:
        b = r.blocks
        blocks = f"{b.get('zero', 0)}/{b.get('dense', 0)}/{b.get('lowrank', 0)}"
        ratio = r.byte_ratio
        return (
            r.name,
            r.op,
            shape,
            blocks,
            str(r.max_rank),
            "yes" if r.permuted else "no",
            f"{r.bytes_before}->{r.bytes_after}",
            "-" if ratio is None else f"{ratio:.3f}",
            r.precision or "-",
            _num(r.rel_certified_error),
            f"compressed ({_mode(r)}, {r.nodes} node{'' if r.nodes == 1 else 's'})",
        )
    before = "-" if r.bytes_before is None else str(r.bytes_before)
    return (r.name, r.op, shape, "-", "-", "-", before, "-", "-", "-", f"skipped: {r.reason}")


def _mode(r: LayerRecord) -> str:
    if r.family in ("batched", "blocks"):
        return f"{r.emit} {r.family}"
    return str(r.emit)


def _metadata(model) -> dict[str, str]:
    """Model metadata as a dict, from an ``ir.Model`` (a dict) or a ``ModelProto`` (entries)."""
    props = model.metadata_props
    if isinstance(props, Mapping):
        return dict(props)
    return {p.key: p.value for p in props}


def has_layers(model) -> bool:
    """Whether the model carries ``dehm.layers`` metadata."""
    return LAYERS_KEY in _metadata(model)


def read_layers(model) -> list[dict]:
    """The ``dehm.layers`` entries of a model (``ir.Model`` or ``ModelProto``); [] when absent.

    An entry without ``tol_out`` gets its ``tol`` (the rule ``OptimizeConfig.layer_tol_out``
    applies when the pass writes them).

    Raises:
        InvalidModelError: the metadata is not a JSON list of objects with at least
            ``name``, ``output`` and a bound (``tol_out`` or ``tol``).
    """
    props = _metadata(model)
    if LAYERS_KEY not in props:
        return []
    try:
        layers = json.loads(props[LAYERS_KEY])
    except json.JSONDecodeError as e:
        raise InvalidModelError(f"{LAYERS_KEY!r} metadata is not valid JSON: {e}") from e
    if not isinstance(layers, list):
        raise InvalidModelError(f"{LAYERS_KEY!r} metadata must be a JSON list, got {type(layers).__name__}")
    for index, record in enumerate(layers):
        missing = [k for k in _REQUIRED_KEYS if not isinstance(record, dict) or k not in record]
        if missing or ("tol_out" not in record and "tol" not in record):
            raise InvalidModelError(f"{LAYERS_KEY!r} record {index} lacks {missing or ['tol_out']}: {record!r}")
        record.setdefault("tol_out", record.get("tol"))  # entries written by hand may give tol only
    return layers


def write_layers(metadata: MutableMapping[str, str], layers: list[dict]) -> None:
    """Set ``dehm.layers`` (and ``dehm.version``) in an ``ir.Model``'s metadata dict."""
    from . import __version__

    metadata[LAYERS_KEY] = json.dumps(layers)
    metadata[VERSION_KEY] = __version__
