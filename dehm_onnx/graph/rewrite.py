"""The pass: replace constant MatMul/Gemm weights by error-bounded H-matrices.

For each candidate found by ``scan`` (``Y = X @ W`` orientation, see its table)::

    MatMul(X, W)              -> E(X)
    MatMul(W, X)              -> Transpose(E(Transpose(X)))        (X of rank >= 2)
    Gemm(A, W, C; α, β, tA)   -> α · E(op(A)) + β · C
    Gemm(W, B, C; α, β, tB)   -> α · Transpose(E(op(B)ᵀ)) + β · C

where ``E(x) = x @ W_H`` is what the chosen emitter writes (``EMITTERS``), ``α·`` is a Mul
only when α ≠ 1 and ``β·C`` a Mul only when β ≠ 1. The last node takes over the original
output value, so every other node, graph input and output stays as it was. W is the float
tensor the weight's ``WeightSource`` computes (an initializer, a Constant, or a dequantize /
cast / reshape / transpose chain of one); the chain's nodes and stored tensors are removed
when nothing else reads them.

Clamp step: when X is provably nonnegative (``graph/nonneg.py``), W has no negative entry,
``α >= 0`` and there is no bias (or a nonnegative one with ``β >= 0``), the original layer's
output is ``>= 0`` everywhere; a ``Relu`` then follows the emitted product. Clamping a value
whose true result is ``>= 0`` can only reduce its error, and a downstream ``Log``/``Sqrt``
never sees the small negative values a compressed W can produce (main graph only).

Each candidate goes through scan -> check -> compress -> emit -> splice -> record.
``_splice`` is the only function that changes the model. A weight used by several
candidates is compressed once (per orientation) and its factors are stored once; a weight
also read by any node that stays dense is left alone for all of its users (compressing it
would store it twice). Emitted nodes carry ``dehm.*`` metadata and are never candidates,
so running the pass again changes nothing.

Extension points: ``CompressWeightsPass(config, compressor=...)`` replaces how the weights
are compressed (``Compressor``: ``LayerTask`` list in, ``LayerResult`` list out, in order);
``select_candidates`` is the selection the pass makes, for callers that transform the same
weights otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from .. import __version__
from ..compression.parallel import LayerResult, LayerTask, compress_layers
from ..compression.skips import Skip, SkipReason, check_gain
from ..report import LayerRecord, Report, read_layers, write_layers
from .checks import check_candidate, check_weight
from .emit import EMITTERS, Emission, EmitContext
from .emit_function import fit_function_to_model
from .emit_ops import initializer
from .inline import inline_weight_functions
from .names import compact_function_names, compact_names
from .nonneg import nonnegative_values
from .cost import INITIALIZER_BYTES
from .opset import INT_OPSET, upgrade_opset
from .scan import Candidate, scan

__all__ = ["CompressWeightsPass", "CompressResult", "Compressor", "Selection", "select_candidates"]

logger = logging.getLogger(__name__)

# Allowance per compressed layer for what the model gains besides the layer's own entry: the
# dehm.layers / dehm.version keys, the version string, the ai.dehm opset import.
MODEL_METADATA_BYTES = 64
# Bytes the engine counts per stored block or tier (``compress``'s ``block_overhead``): what
# the emission adds per block beyond the arrays' values (measured, docs/hmatrix.md).
BLOCK_OVERHEAD = 64

# compressor(tasks, jobs, on_done) -> results in task order (``compress_layers``'s contract).
Compressor = Callable[[Sequence[LayerTask], int, Callable[[LayerTask, LayerResult], None] | None], list[LayerResult]]


@dataclass
class CompressResult(ir.passes.PassResult):
    """``PassResult`` plus the per-layer report."""

    report: Report = field(default_factory=Report)


@dataclass
class _Group:
    """Candidates whose weights come from one stored tensor."""

    stored: ir.Value
    cands: list[Candidate] = field(default_factory=list)


@dataclass
class Selection:
    """What ``select_candidates`` found: every candidate in graph order, the candidates
    grouped by stored tensor, the skip of each skipped candidate (keyed by ``id``), and the
    model-local functions inlined to reach weights passed into them."""

    candidates: list[Candidate]
    groups: list[_Group]
    skips: dict[int, Skip]
    inlined: list[str] = field(default_factory=list)

    def live(self, group: _Group) -> list[Candidate]:
        """The candidates of ``group`` that are not skipped."""
        return [c for c in group.cands if id(c) not in self.skips]


class CompressWeightsPass(ir.passes.InPlacePass):
    """Compress every eligible constant MatMul/Gemm weight of a model, in place.

    Args:
        config: an ``OptimizeConfig``.
        layer_tols: optional per-layer ``tol`` overrides keyed by layer name (used to
            tighten single layers); a shared weight takes the smallest tol of its users.
        progress: optional ``dehm_onnx.progress.ProgressBar`` (or any object with
            ``start(total)`` and ``layer(name, params, dense_params)``).
        compressor: how the weights are compressed; default ``compress_layers`` (H-matrices,
            ``config.jobs`` worker processes).
    """

    def __init__(self, config, layer_tols: dict[str, float] | None = None, progress=None, compressor: Compressor | None = None):
        super().__init__()
        self.config = config
        self.layer_tols = dict(layer_tols or {})
        self.emitter = EMITTERS[config.emit]
        self.progress = progress
        self.compressor = compressor or compress_layers
        self._written: list[ir.Value] = []
        self._nonneg: set[str] = set()

    def requires(self, model: ir.Model) -> None:
        """No name is written twice: new names are made unique against the existing ones, and
        the last emitted node takes over an output's name. (An empty name is an omitted
        optional output.)"""
        seen: set[str] = set()
        for graph in model.graphs():
            for value in (*graph.inputs, *graph.initializers.values()):
                seen.add(value.name)
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            for value in node.outputs:
                if not value.name:
                    continue
                if value.name in seen:
                    raise ir.passes.PreconditionError(f"node {node.name!r} writes {value.name!r}, which is not a new name")
                seen.add(value.name)

    def ensures(self, model: ir.Model) -> None:
        """Every value a node reads is defined, and every initializer the pass wrote is read."""
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            for value in node.inputs:
                if value is not None and value.producer() is None and not (value.is_initializer() or value.is_graph_input()):
                    raise ir.passes.PostconditionError(f"node {node.name!r} reads {value.name!r}, which nothing defines")
        for value in self._written:
            if not value.uses():
                raise ir.passes.PostconditionError(f"initializer {value.name!r} written by the pass is unused")

    def call(self, model: ir.Model) -> CompressResult:
        """Rewrite ``model`` in place; return it with the report."""
        self._written = []
        self._notes = []
        self._prefixes = []
        self._counted_functions = set(model.functions)  # identifiers
        self._model_opset = model.opset_imports.get("", 0)
        selection = select_candidates(model, self.config)
        compressed = self._compress_groups(selection)
        selection, compressed = self._opset_for_integers(model, selection, compressed)
        self._opset = model.opset_imports.get("", 0)
        # Signs are read from the model as it was, before any layer is spliced.
        live = len(selection.skips) < len(selection.candidates)
        self._nonneg = nonnegative_values(model) if live else set()
        names = _all_names(model)
        records: dict[int, LayerRecord] = {}
        emitted: dict[tuple, tuple[Emission, list[ir.Value]]] = {}
        for cand in selection.candidates:
            if id(cand) in selection.skips or cand.share_key in emitted:
                continue
            hm, tol = compressed[cand.share_key]
            emission, local = self._emit(cand, hm, tol, names)
            users = [c for c in selection.candidates if c.share_key == cand.share_key and id(c) not in selection.skips]
            skip = self._byte_check(cand, emission, hm, tol, users)
            if skip is None:
                emitted[cand.share_key] = (emission, local)
                self._counted_functions.update(f.identifier() for f in emission.functions)
            else:
                for other in selection.candidates:
                    if other.share_key == cand.share_key and id(other) not in selection.skips:
                        selection.skips[id(other)] = skip
        for cand in selection.candidates:
            skip = selection.skips.get(id(cand))
            if skip is not None:
                logger.info("skipped %s %r: %s", cand.op, cand.name, skip.sentence)
                records[id(cand)] = _skipped_record(cand, skip)
                continue
            hm, tol = compressed[cand.share_key]
            first = emitted.get(cand.share_key)
            if first is not None and first[0] is not None:
                emission, local = first
                factors = emission.initializers
                emitted[cand.share_key] = (None, emission.initializers, emission.functions)
                stored_bytes = _emitted_bytes(emission)
            else:
                emission, local = self._emit(cand, hm, tol, names)
                _reuse_initializers(emission, first[1])
                emission = _reuse_functions(emission, first[2])
                factors, stored_bytes = [], 0
            _splice(model, cand, emission, factors, local)
            self._written += list(factors) + list(local)
            records[id(cand)] = self._compressed_record(cand, hm, tol, emission, stored_bytes)
            logger.info("compressed %s %r: %d -> %d bytes", cand.op, cand.name, _source_bytes(cand), stored_bytes)
        for group in selection.groups:
            if not any(id(c) in selection.skips for c in group.cands):
                for cand in group.cands:
                    cand.source.remove_unused()
        report = Report(
            layers=[records[id(c)] for c in selection.candidates],
            tol=self.config.tol,
            emit=self.config.emit,
            version=__version__,
            inlined_functions=selection.inlined,
            notes=list(self._notes),
        )
        modified = bool(report.compressed) or bool(selection.inlined)
        if report.compressed:
            write_layers(model.metadata_props, read_layers(model) + [r.metadata_entry() for r in report.compressed])
        return CompressResult(model, modified, report)

    def _opset_for_integers(self, model: ir.Model, selection: Selection, compressed: dict):
        """Raise the model to opset 21 when a compressed layer stores integers and the model is
        older (int4 tensors and blocked ``DequantizeLinear`` need it). The candidates are found
        again in the converted model; if the converter fails, or changes any of them, the
        model stays as it was and integers are written in forms its opset allows (int4 as
        int8, dequantized at load time), which the report notes."""
        opset = model.opset_imports.get("", 0)
        uses_int = any(a.storage.is_int for hm, _ in compressed.values() for b in hm.blocks for a in b.storage)
        if opset >= INT_OPSET or not uses_int:
            return selection, compressed
        reason = upgrade_opset(model, INT_OPSET, keep=lambda upgraded: _same_layers(upgraded, selection, self.config))
        if reason is not None:
            logger.warning("%s; integer arrays are written for opset %d", reason, opset)
            self._notes.append(f"{reason}: int4 arrays stored as int8 and integers dequantized when the session is created")
            return selection, compressed
        self._notes.append(f"default-domain opset raised from {opset} to {INT_OPSET} for the integer arrays (onnx version converter)")
        fresh = select_candidates(model, self.config)
        fresh.inlined = selection.inlined
        by_key = {_stable_key(c): c for c in selection.candidates}
        moved = {}
        for cand in fresh.candidates:
            old = by_key[_stable_key(cand)]
            if id(old) in selection.skips:
                fresh.skips[id(cand)] = selection.skips[id(old)]
            elif old.share_key in compressed:
                moved[cand.share_key] = compressed[old.share_key]
        return fresh, moved

    def _byte_check(self, cand: Candidate, emission: Emission, hm, tol: float, users: list[Candidate]) -> Skip | None:
        """Never more bytes than the weight took: the emitted tensors, the protobuf of the new
        nodes and functions (serialized), of the initializers' headers (bounded) and of the
        layer's ``dehm.layers`` metadata entry against the stored tensor, the constants its
        source chain reads and the node replaced (and at most ``max_ratio`` of them). The
        nodes and entry are counted once per user of a shared weight (``users``, with
        ``cand``), the tensors and functions once (a function an earlier layer brought, not at all)."""
        per_user = _protobuf_bytes(emission.nodes, [])
        per_user += len(json.dumps(self._compressed_record(cand, hm, tol, emission, 0).metadata_entry()))
        after = _emitted_bytes(emission) + sum(_initializer_header_bytes(v) for v in emission.initializers)
        # A function another layer already brought (the ai.dehm decoders) is stored once.
        new = [f for f in emission.functions if f.identifier() not in self._counted_functions]
        after += _protobuf_bytes([], new)
        after += max(len(users), 1) * (per_user + MODEL_METADATA_BYTES)
        before = _source_bytes(cand) + INITIALIZER_BYTES + _protobuf_bytes([u.node for u in users] or [cand.node], [])
        return check_gain(after, before, self._tol(cand), self.config.max_ratio)

    def _tol(self, cand: Candidate) -> float:
        return float(self.layer_tols.get(cand.name, self.config.tol))

    def _compress_groups(self, selection: Selection) -> dict[tuple, tuple]:
        """Compress each (weight, orientation) once; skip the whole group when any part fails.

        Results come back in task order, so the model does not depend on the number of
        workers.
        """
        tasks, owners = [], []
        for group in selection.groups:
            live = selection.live(group)
            for key in dict.fromkeys(c.share_key for c in live):
                users = [c for c in live if c.share_key == key]
                tol = min(self._tol(c) for c in users)
                tasks.append(_task(users[0], tol, self.config))
                owners.append((live, key, tol, None))
                if self._tries_float16(users[0]):
                    tasks.append(dataclasses.replace(tasks[-1], precision="fp16"))
                    owners.append((live, key, tol, users[0]))
        if self.progress is not None:
            self.progress.start(sum(alternative is None for *_, alternative in owners))
        results = self.compressor(tasks, getattr(self.config, "jobs", 1), self._on_done)
        out: dict[tuple, tuple] = {}
        for (live, key, tol, alternative_for), result in zip(owners, results):
            if alternative_for is not None:
                if key in out and result.skip is None:
                    out[key] = (self._smaller_emission(alternative_for, out[key][0], result.hm), tol)
            elif result.skip is not None:
                for cand in live:
                    selection.skips.setdefault(id(cand), result.skip)
            else:
                out[key] = (result.hm, tol)
        return out

    def _tries_float16(self, cand: Candidate) -> bool:
        """Whether a small weight is also compressed in float16 storage only, to keep the
        form whose standard-op emission takes fewer bytes: the engine counts the bytes of
        the arrays, and on small layers the nodes dequantizing integer arrays can cost more
        than the integers save (whisper128's filterbank: 13.8 KB in float16 against 17.6 KB)."""
        return (
            self.config.precision == "auto"
            and self.config.emit in ("auto", "ops")
            and self.compressor is compress_layers
            and int(np.prod(cand.source.shape)) <= SMALL_WEIGHT_ELEMENTS
        )

    def _smaller_emission(self, cand: Candidate, hm, alternative):
        """``hm`` or ``alternative``, whichever standard-op emission takes fewer bytes at the
        opset integer arrays would be written for (``hm`` when equal)."""
        context = EmitContext(
            x_rank=cand.x_rank,
            opset=max(INT_OPSET, self._model_opset),
            fuse_int=self.config.fuses_integers(self.config.layer_tol_out, hm.rel_certified_error),
        )

        def size(h) -> int:
            emission = self.emitter(h, ir.Value(name="x"), "hm", cand.source.dtype, context)
            compact_names(emission.nodes, emission.initializers, "hm")
            headers = sum(_initializer_header_bytes(v) for v in emission.initializers)
            return _emitted_bytes(emission) + headers + _protobuf_bytes(emission.nodes, emission.functions)

        chosen = alternative if size(alternative) < size(hm) else hm
        if chosen is alternative:
            logger.info("layer %r: float16 storage emits fewer bytes than the mixed precision", cand.name)
        return chosen

    def _on_done(self, task, result) -> None:
        if self.progress is not None and task.precision == self.config.engine_precision:  # not a float16 alternative
            params = result.hm.params if result.hm is not None else result.dense_params
            self.progress.layer(task.name, int(params), int(result.dense_params))

    def _emit(self, cand: Candidate, hm, tol: float, names: set[str]) -> tuple[Emission, list[ir.Value]]:
        """Nodes replacing ``cand``: optional transpose of X, the emitter's ``x @ W_H``, then
        transpose / alpha / bias steps; returns the emission and the Gemm scalars."""
        prefix = _unique_prefix(f"hm{len(self._prefixes)}", names)
        self._prefixes.append(prefix)
        dtype = cand.source.dtype
        pre = _pre_nodes(cand, prefix)
        x = pre[-1].outputs[0] if pre else cand.x
        context = EmitContext(
            x_rank=cand.x_rank,
            opset=self._opset,
            fuse_int=self.config.fuses_integers(self.config.layer_tol_out, hm.rel_certified_error),
        )
        emission = self.emitter(hm, x, prefix, dtype, context)
        self._note_unfused(cand, hm, dtype, context)
        # Sum, not Add, after a product that may feed onnxruntime's quantized kernel: it fuses
        # MatMul + Add into Gemm first, and a Gemm input is never turned into MatMulNBits.
        fused = context.fuse_int and any(a.storage.is_int for b in hm.blocks for a in b.storage)
        post, local = _post_nodes(cand, emission.output, prefix, dtype, clamp=self._clamps(cand), bias_op="Sum" if fused else "Add")
        nodes = pre + list(emission.nodes) + post
        compact_names(nodes, [*emission.initializers, *local], prefix)
        for function in emission.functions:
            compact_function_names(function)
        _tag(nodes, cand, hm, tol)
        output = post[-1].outputs[0] if post else emission.output
        return dataclasses.replace(emission, nodes=nodes, output=output), local

    def _note_unfused(self, cand: Candidate, hm, dtype, context: EmitContext) -> None:
        """Say in the report when integer arrays meant for onnxruntime's quantized kernel are
        dequantized at load instead because the activation dtype has no ``DequantizeLinear``
        output (float64): the layer stays exact, with float memory and speed."""
        has_int = any(a.storage.is_int for b in hm.blocks for a in b.storage)
        if context.fuse_int and has_int and np.dtype(dtype) not in (np.float32, np.float16):
            self._notes.append(
                f"layer {cand.name!r} ({np.dtype(dtype)}): integer arrays dequantized when the session is "
                "created, not fused (DequantizeLinear has no float64 output)"
            )

    def _clamps(self, cand: Candidate) -> bool:
        """Whether the layer's true output is provably ``>= 0`` (see the module docstring)."""
        if cand.graph_path != "main" or cand.alpha < 0 or cand.x_name not in self._nonneg:
            return False
        if cand.c is not None and not (cand.beta >= 0 and cand.c_name in self._nonneg):
            return False
        weight = cand.weight
        clamp = bool(weight.size == 0 or float(np.min(weight)) >= 0.0)
        if clamp:
            logger.info("layer %r: input and weight are nonnegative; its output is clamped at 0", cand.name)
        return clamp

    def _compressed_record(self, cand: Candidate, hm, tol: float, emission: Emission, stored_bytes: int) -> LayerRecord:
        return _record(
            cand,
            shape=list(hm.shape),
            compressed=True,
            tol=tol,
            # The output bound is the user's, even for a layer whose weight tol was tightened.
            tol_out=self.config.layer_tol_out,
            rel_certified_error=float(hm.rel_certified_error),
            params=int(hm.params),
            dense_params=int(hm.dense_params),
            bytes_before=_source_bytes(cand),
            bytes_after=int(stored_bytes),
            precision=precision_mix(hm),
            blocks=hm.counts(),
            max_rank=int(hm.max_rank),
            permuted=hm.row_perm is not None or hm.col_perm is not None,
            emit=_emitted_mode(self.config.emit, emission),
            family=emission.family,
            nodes=len(emission.nodes),
        )


def _emitted_mode(requested: str, emission: Emission) -> str:
    """The mode actually written: ``ops`` for standard-op nodes, whether ``auto`` chose them or
    the function and custom emitters fell back to them (e.g. for a float64 layer)."""
    if emission.family in ("batched", "blocks"):
        return "ops"
    return requested


def precision_mix(hm) -> str:
    """Blocks by kind and storage, e.g. ``lr float+fp16 x283, dense fp16 x256``."""
    parts = []
    for key, count in hm.precision_counts().items():
        kind, storages = key.split(" ", 1)
        parts.append(f"{'lr' if kind == 'lowrank' else kind} {storages} x{count}")
    return ", ".join(parts) or "-"


def _emitted_bytes(emission: Emission) -> int:
    """Bytes of the weight tensors an emission stores (int4 two to a byte)."""
    return sum(_tensor_bytes(v) for v in emission.inputs)


def _protobuf_bytes(nodes, functions) -> int:
    """Serialized bytes of ``nodes`` (with their metadata) and of the model-local ``functions``."""
    total = sum(ir.serde.serialize_node(n).ByteSize() for n in nodes)
    return total + sum(ir.serde.serialize_function(f).ByteSize() for f in functions)


def _initializer_header_bytes(value: ir.Value) -> int:
    """An upper bound on an initializer's protobuf bytes besides its values: name, dims
    (at most 10 bytes each), data type and field tags."""
    tensor = value.const_value
    dims = len(tensor.shape) if tensor is not None else 0
    return len((value.name or "").encode()) + 11 * dims + 16


def _tensor_bytes(value: ir.Value) -> int:
    tensor = value.const_value
    return int(tensor.nbytes) if tensor is not None else 0


def _source_bytes(cand: Candidate) -> int:
    """Bytes the weight takes in the model: its stored tensor and the constants its chain reads."""
    source = cand.source
    total = _tensor_bytes(source.stored) if source.stored.const_value is not None else _constant_node_bytes(source.stored)
    for node in source.nodes:
        for value in list(node.inputs)[1:]:
            if value is not None and value.const_value is not None:
                total += _tensor_bytes(value)
    if total == 0:
        total = int(np.prod(cand.source.shape)) * np.dtype(cand.source.dtype).itemsize
    return int(total)


def _constant_node_bytes(value: ir.Value) -> int:
    node = value.producer()
    if node is None or node.op_type != "Constant":
        return 0
    attr = node.attributes.get("value")
    tensor = attr.value if attr is not None else None
    return int(tensor.nbytes) if tensor is not None else 0


def _stable_key(cand: Candidate) -> tuple:
    """Identifies a candidate across an opset conversion (names survive it, objects do not)."""
    return (cand.graph_path, cand.name, cand.weight_name, cand.weight_index, cand.trans_w)


def _same_layers(model: ir.Model, selection: Selection, config) -> bool:
    """Whether ``model`` (converted) has the same candidates as ``selection``."""
    fresh = select_candidates(model, config)
    return sorted(map(_stable_key, fresh.candidates)) == sorted(map(_stable_key, selection.candidates))


def _transpose(x: ir.Value, name: str, rank: int | None) -> ir.Node:
    rank = rank or 2
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    return ir.node("Transpose", [x], {"perm": perm}, name=name, outputs=[ir.Value(name=f"{name}_out")])


def _pre_nodes(cand: Candidate, prefix: str) -> list[ir.Node]:
    """``Transpose(X)`` when the candidate's activation must be transposed, else nothing."""
    if not cand.trans_x:
        return []
    node = _transpose(cand.x, f"{prefix}/transpose_x", cand.x_rank)
    node.outputs[0].name = f"{prefix}/x_t"
    return [node]


def _post_nodes(cand: Candidate, current: ir.Value, prefix: str, dtype, clamp: bool = False,
                bias_op: str = "Add") -> tuple[list[ir.Node], list[ir.Value]]:
    """What follows ``x @ W_H``, in order: transpose back, scale by alpha, add beta*C, clamp at 0."""
    nodes: list[ir.Node] = []
    scalars: list[ir.Value] = []
    if cand.trans_y:
        nodes.append(_transpose(current, f"{prefix}/transpose_y", cand.x_rank))
        nodes[-1].outputs[0].name = f"{prefix}/transpose_out"
        current = nodes[-1].outputs[0]
    if cand.alpha != 1.0:
        scalars.append(initializer(f"{prefix}/alpha", np.asarray(cand.alpha, dtype=dtype)))
        nodes.append(ir.node("Mul", [current, scalars[-1]], name=f"{prefix}/mul_alpha", outputs=[ir.Value(name=f"{prefix}/alpha_out")]))
        current = nodes[-1].outputs[0]
    if cand.c is not None:
        bias = cand.c
        if cand.beta != 1.0:
            scalars.append(initializer(f"{prefix}/beta", np.asarray(cand.beta, dtype=dtype)))
            nodes.append(ir.node("Mul", [cand.c, scalars[-1]], name=f"{prefix}/mul_beta", outputs=[ir.Value(name=f"{prefix}/beta_c")]))
            bias = nodes[-1].outputs[0]
        nodes.append(ir.node(bias_op, [current, bias], name=f"{prefix}/add_bias", outputs=[ir.Value(name=f"{prefix}/bias_out")]))
        current = nodes[-1].outputs[0]
    if clamp:
        nodes.append(ir.node("Relu", [current], name=f"{prefix}/clamp", outputs=[ir.Value(name=f"{prefix}/clamp_out")]))
    return nodes, scalars


def _task(cand: Candidate, tol: float, config) -> LayerTask:
    """The compression of the candidate's weight as a self-contained task.

    An external weight travels as its validated file slice (with the steps computing the
    float weight from it) and is memory-mapped by the worker; an in-memory weight travels as
    its array.
    """
    return LayerTask(
        cand.weight_name,
        cand.source.recipe(),
        cand.trans_w,
        tol,
        config.seed,
        config.max_ratio,
        precision=config.engine_precision,
        block_overhead=BLOCK_OVERHEAD,
        stored_nbytes=_source_bytes(cand),
        scale_dtype=_scale_dtype(cand, config),
    )


def _scale_dtype(cand: Candidate, config) -> str | None:
    """float16 scales for a float32 weight written as packed ``HMatMul`` inputs (``custom``,
    ``function``): their kernels and decoders read float16 scales, and they take half the
    bytes (the 4096² log kernel at tol 1e-2: 0.0049 -> 0.0047 of dense). Standard ops keep
    the activation's dtype, which onnxruntime's fused ``MatMulNBits`` needs (None: the default)."""
    if config.emit in ("custom", "function") and np.dtype(cand.source.dtype) == np.float32:
        return "float16"
    return None


def _record(cand: Candidate, **fields) -> LayerRecord:
    """A report record with the candidate's identity (names, graph, source) and the given fields."""
    return LayerRecord(
        name=cand.name,
        op=cand.op,
        output=cand.output,
        weight=cand.weight_name,
        graph=cand.graph_path,
        weight_graph=cand.weight_graph,
        source=cand.source.kind,
        x=cand.x_name,
        x_transposed=cand.trans_x,
        **fields,
    )


def _skipped_record(cand: Candidate, skip: Skip) -> LayerRecord:
    shape = list(cand.shape)
    dense = int(np.prod(shape)) if shape else 0
    return _record(
        cand,
        shape=shape,
        bytes_before=_source_bytes(cand) if cand.source is not None else None,
        compressed=False,
        skip_reason=skip.reason.name,
        reason=skip.sentence,
        dense_params=dense,
    )


def select_candidates(model: ir.Model, config) -> Selection:
    """Scan ``model`` and decide which candidates are skipped, and why.

    Model-local functions that receive a constant weight and use it in a MatMul/Gemm are
    inlined first (``inline_weight_functions``), so that their weights become candidates.
    """
    inlined = inline_weight_functions(model)
    candidates = scan(model).candidates
    opset = model.opset_imports.get("", 0)
    skips: dict[int, Skip] = {}
    for cand in candidates:
        skip = check_candidate(cand, config, opset) or check_weight(cand, config)
        if skip:
            skips[id(cand)] = skip
    groups = _group_by_stored(candidates)
    for group in groups:
        _skip_shared(group, skips)
    return Selection(candidates, groups, skips, inlined)


def _group_by_stored(cands: list[Candidate]) -> list[_Group]:
    groups: dict[int, _Group] = {}
    for cand in cands:
        groups.setdefault(id(cand.source.stored), _Group(cand.source.stored)).cands.append(cand)
    return list(groups.values())


def _skip_shared(group: _Group, skips: dict[int, Skip]) -> None:
    """Skip every user of a stored tensor that some node or graph output keeps reading densely.

    The reads are followed through the chain nodes of the group's sources: a read by a
    chain node leads on to that node's output; a read by a live candidate at its weight
    input is covered; any other read keeps the tensor (or a value computed from it) dense.
    """
    chain = {id(n) for c in group.cands for n in c.source.nodes}
    live = {(id(c.node), c.weight_index) for c in group.cands if id(c) not in skips}
    keepers, seen, frontier = [], set(), [group.stored]
    while frontier:
        value = frontier.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if value.is_graph_output():
            keepers.append("a graph output")
        for use in value.uses():
            if id(use.node) in chain:
                frontier.extend(use.node.outputs)
            elif (id(use.node), use.idx) not in live:
                keepers.append(use.node.name or use.node.op_type)
    for cand in group.cands:
        others = [v for i, v in enumerate(cand.node.inputs) if i != cand.weight_index]
        if any(v is cand.source.value or v is group.stored for v in others):
            keepers.append(cand.name)
    if not keepers:
        return
    users = ", ".join(repr(k) for k in dict.fromkeys(keepers))
    for cand in group.cands:
        if id(cand) not in skips:
            skips[id(cand)] = Skip.of(SkipReason.SHARED_WEIGHT, weight=cand.weight_name, users=users)


def _tag(nodes: list[ir.Node], cand: Candidate, hm, tol: float) -> None:
    """Provenance: which node the new products (``MatMul``, ``Gemm``, ``HMatMul``: so that they
    are never candidates) and the layer's last node replace; the last node also carries the
    bound. Other nodes are not tagged: on small layers the tags cost more bytes than the
    weights."""
    for node in nodes:
        if node.op_type in _PRODUCT_OPS or node is nodes[-1]:
            node.metadata_props["dehm.source_node"] = cand.name
    nodes[-1].metadata_props["dehm.tol"] = repr(float(tol))
    nodes[-1].metadata_props["dehm.rel_certified_error"] = repr(float(hm.rel_certified_error))


_PRODUCT_OPS = ("MatMul", "Gemm", "HMatMul")
# Weights up to this many elements are also compressed in float16 only (``_tries_float16``).
SMALL_WEIGHT_ELEMENTS = 1 << 20


def _all_names(model: ir.Model) -> set[str]:
    names: set[str] = set()
    for graph in model.graphs():
        names.update(v.name for v in (*graph.inputs, *graph.outputs, *graph.initializers.values()) if v.name)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        names.update(v.name for v in node.outputs if v.name)
        if node.name:
            names.add(node.name)
    return names


def _unique_prefix(base: str, names: set[str]) -> str:
    """A prefix no existing name starts with; it is then reserved."""
    candidate, i = base, 0
    while any(n.startswith(candidate) for n in names):
        i += 1
        candidate = f"{base}{i}"
    names.add(candidate)
    return candidate


def _reuse_initializers(emission: Emission, shared: list[ir.Value]) -> None:
    """Point ``emission``'s nodes at the initializers of the first emission of the same weight."""
    assert len(emission.initializers) == len(shared), "Bug: emitters must be deterministic for shared weights"
    for new, old in zip(emission.initializers, shared):
        ir.convenience.replace_all_uses_with(new, old)


def _reuse_functions(emission: Emission, shared: list[ir.Function]) -> Emission:
    """Point ``emission``'s nodes at the function overloads of the first emission of the same
    weight, so that a shared weight's function body is stored once."""
    assert len(emission.functions) == len(shared), "Bug: emitters must be deterministic for shared weights"
    overloads = {(f.domain, f.name, f.overload): old.overload for f, old in zip(emission.functions, shared)}
    for node in emission.nodes:
        key = (node.domain, node.op_type, node.overload)
        if key in overloads:
            node.overload = overloads[key]
    return dataclasses.replace(emission, functions=[])


def _splice(model: ir.Model, cand: Candidate, emission: Emission, factors: list[ir.Value], local: list[ir.Value]) -> None:
    """Replace ``cand.node`` by the emitted nodes at its position; add initializers and functions.

    The factors live beside the stored weight they replace (so a subgraph node can share an
    outer-scope weight's factors); the Gemm scalars live beside the node.
    """
    graph = cand.graph
    old = cand.node
    ir.convenience.replace_nodes_and_values(graph, old, [old], emission.nodes, [old.outputs[0]], [emission.output])
    home = cand.source.graph
    for value in factors:
        home.register_initializer(value)
    for value in local:
        graph.register_initializer(value)
    for function in emission.functions:
        if function.identifier() not in model.functions:
            fit_function_to_model(model, function)  # opsets and IR version (emit_function)
            model.functions[function.identifier()] = function
    for node in emission.nodes:
        if node.domain not in ("", "ai.onnx") and node.domain not in model.opset_imports:
            model.opset_imports[node.domain] = 1
