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

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from .. import __version__
from ..compression.parallel import LayerResult, LayerTask, compress_layers
from ..compression.skips import Skip, SkipReason
from ..report import LayerRecord, Report, read_layers, write_layers
from .checks import check_candidate, check_weight
from .emit import EMITTERS, Emission
from .emit_function import fit_function_to_model
from .emit_ops import initializer
from .inline import inline_weight_functions
from .nonneg import nonnegative_values
from .scan import Candidate, scan

__all__ = ["CompressWeightsPass", "CompressResult", "Compressor", "Selection", "select_candidates"]

logger = logging.getLogger(__name__)

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
        selection = select_candidates(model, self.config)
        compressed = self._compress_groups(selection)
        # Signs are read from the model as it was, before any layer is spliced.
        live = len(selection.skips) < len(selection.candidates)
        self._nonneg = nonnegative_values(model) if live else set()
        names = _all_names(model)
        records: dict[int, LayerRecord] = {}
        emitted: dict[tuple, list[ir.Value]] = {}
        for cand in selection.candidates:
            skip = selection.skips.get(id(cand))
            if skip is not None:
                logger.info("skipped %s %r: %s", cand.op, cand.name, skip.sentence)
                records[id(cand)] = _skipped_record(cand, skip)
                continue
            hm, tol = compressed[cand.share_key]
            emission, local = self._emit(cand, hm, tol, names)
            shared = emitted.get(cand.share_key)
            if shared is None:
                emitted[cand.share_key] = emission.initializers
                factors = emission.initializers
            else:
                _reuse_initializers(emission, shared)
                factors = []
            _splice(model, cand, emission, factors, local)
            self._written += list(factors) + list(local)
            records[id(cand)] = self._compressed_record(cand, hm, tol, len(emission.nodes))
            logger.info("compressed %s %r: %d -> %d params", cand.op, cand.name, hm.dense_params, hm.params)
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
        )
        modified = bool(report.compressed) or bool(selection.inlined)
        if report.compressed:
            write_layers(model.metadata_props, read_layers(model) + [r.metadata_entry() for r in report.compressed])
        return CompressResult(model, modified, report)

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
                owners.append((live, key, tol))
        if self.progress is not None:
            self.progress.start(len(tasks))
        results = self.compressor(tasks, getattr(self.config, "jobs", 1), self._on_done)
        out: dict[tuple, tuple] = {}
        for (live, key, tol), result in zip(owners, results):
            if result.skip is not None:
                for cand in live:
                    selection.skips.setdefault(id(cand), result.skip)
            else:
                out[key] = (result.hm, tol)
        return out

    def _on_done(self, task, result) -> None:
        if self.progress is not None:
            params = result.hm.params if result.hm is not None else result.dense_params
            self.progress.layer(task.name, int(params), int(result.dense_params))

    def _emit(self, cand: Candidate, hm, tol: float, names: set[str]) -> tuple[Emission, list[ir.Value]]:
        """Nodes replacing ``cand``: optional transpose of X, the emitter's ``x @ W_H``, then
        transpose / alpha / bias steps; returns the emission and the Gemm scalars."""
        prefix = _unique_prefix(f"{cand.weight_name}.hm", names)
        dtype = cand.source.dtype
        pre = _pre_nodes(cand, prefix)
        x = pre[-1].outputs[0] if pre else cand.x
        emission = self.emitter(hm, x, prefix, dtype)
        post, local = _post_nodes(cand, emission.output, prefix, dtype, clamp=self._clamps(cand))
        nodes = pre + list(emission.nodes) + post
        _tag(nodes, cand, hm, tol)
        output = post[-1].outputs[0] if post else emission.output
        return Emission(nodes, list(emission.initializers), output, list(emission.functions)), local

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

    def _compressed_record(self, cand: Candidate, hm, tol: float, node_count: int) -> LayerRecord:
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
            blocks=hm.counts(),
            max_rank=int(hm.max_rank),
            permuted=hm.row_perm is not None or hm.col_perm is not None,
            emit=_emitted_mode(self.config.emit, cand.source.dtype),
            nodes=node_count,
        )


def _emitted_mode(requested: str, dtype) -> str:
    """The mode actually written: HMatMul takes float32/float16 only, others use ``ops``."""
    from .emit_function import SUPPORTED_DTYPES

    return requested if requested == "ops" or np.dtype(dtype) in SUPPORTED_DTYPES else "ops"


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


def _post_nodes(cand: Candidate, current: ir.Value, prefix: str, dtype, clamp: bool = False) -> tuple[list[ir.Node], list[ir.Value]]:
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
        nodes.append(ir.node("Add", [current, bias], name=f"{prefix}/add_bias", outputs=[ir.Value(name=f"{prefix}/bias_out")]))
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
    return LayerTask(cand.weight_name, cand.source.recipe(), cand.trans_w, tol, config.seed, config.max_ratio)


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
    """Provenance: which node a new node replaces, with which bound."""
    for node in nodes:
        node.metadata_props["dehm.source_node"] = cand.name
        node.metadata_props["dehm.tol"] = repr(float(tol))
        node.metadata_props["dehm.rel_certified_error"] = repr(float(hm.rel_certified_error))


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
