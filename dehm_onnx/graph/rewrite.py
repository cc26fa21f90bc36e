"""The pass: replace constant MatMul/Gemm weights by error-bounded H-matrices.

For each candidate found by ``scan`` (``Y = X @ W`` orientation, see its table)::

    MatMul(X, W)              -> E(X)
    MatMul(W, X)              -> Transpose(E(Transpose(X)))        (X of rank >= 2)
    Gemm(A, W, C; α, β, tA)   -> α · E(op(A)) + β · C
    Gemm(W, B, C; α, β, tB)   -> α · Transpose(E(op(B)ᵀ)) + β · C

where ``E(x) = x @ W_H`` is what the chosen emitter writes (``EMITTERS``), ``α·`` is a Mul
only when α ≠ 1 and ``β·C`` a Mul only when β ≠ 1. The last node writes the original
output name, so every other node, graph input and output stays as it was.

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
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .. import __version__
from ..config import OptimizeConfig
from ..parallel import LayerTask, compress_layers
from ..report import LayerRecord, Report
from .checks import Skip, SkipReason, check_candidate, check_weight
from .emit import EMITTERS
from .external import weight_slice
from .emit_function import fit_function_to_model
from .nonneg import nonnegative_tensors
from .scan import Candidate, ConstRef, activation_ranks, iter_graphs, scan

__all__ = ["CompressWeightsPass", "PassResult", "select_candidates", "LAYERS_KEY", "VERSION_KEY", "read_layers"]

logger = logging.getLogger(__name__)

LAYERS_KEY = "dehm.layers"
VERSION_KEY = "dehm.version"


@dataclass
class PassResult:
    """The (mutated) model, whether anything changed, and the per-layer report."""

    model: onnx.ModelProto
    modified: bool
    report: Report


@dataclass
class _Group:
    """Candidates sharing one constant."""

    const: ConstRef
    cands: list[Candidate] = field(default_factory=list)


class CompressWeightsPass:
    """Compress every eligible constant MatMul/Gemm weight of a model, in place.

    Args:
        config: an ``OptimizeConfig``.
        layer_tols: optional per-layer ``tol`` overrides keyed by layer name (used to
            tighten single layers); a shared weight takes the smallest tol of its users.
        progress: optional ``dehm_onnx.progress.ProgressBar`` (or any object with
            ``start(total)`` and ``layer(name, params, dense_params)``).
    """

    def __init__(self, config, layer_tols: dict[str, float] | None = None, progress=None):
        self.config = config
        self.layer_tols = dict(layer_tols or {})
        self.emitter = EMITTERS[config.emit]
        self.progress = progress
        self._nonneg: set = set()

    def call(self, model: onnx.ModelProto) -> PassResult:
        """Rewrite ``model`` in place and return it with the report."""
        candidates, groups, skips = select_candidates(model, self.config)
        compressed = self._compress_groups(groups, skips)
        # Signs are read from the model as it was, before any layer is spliced.
        self._nonneg = nonnegative_tensors(model) if len(skips) < len(candidates) else set()

        names = _all_names(model)
        records: dict[int, LayerRecord] = {}
        emitted: dict[tuple, list[onnx.TensorProto]] = {}
        for cand in candidates:
            skip = skips.get(id(cand))
            if skip is not None:
                logger.info("skipped %s %r: %s", cand.op, cand.name, skip.sentence)
                records[id(cand)] = _skipped_record(cand, skip)
                continue
            hm, tol = compressed[cand.share_key]
            nodes, factors, local, functions = self._emit(cand, hm, tol, names)
            shared = emitted.get(cand.share_key)
            if shared is None:
                emitted[cand.share_key] = factors
            else:
                _reuse_initializers(nodes, factors, shared)
                factors = []
            _splice(model, cand, nodes, factors, local, functions)
            records[id(cand)] = self._compressed_record(cand, hm, tol, len(nodes))
            logger.info("compressed %s %r: %d -> %d params", cand.op, cand.name, hm.dense_params, hm.params)
        for group in groups:
            if all(id(c) not in skips for c in group.cands):
                _remove_constant(group.const)

        report = Report(
            layers=[records[id(c)] for c in candidates],
            tol=self.config.tol,
            emit=self.config.emit,
            version=__version__,
        )
        modified = bool(report.compressed)
        if modified:
            _write_metadata(model, report)
        return PassResult(model, modified, report)

    def _tol(self, cand: Candidate) -> float:
        return float(self.layer_tols.get(cand.name, self.config.tol))

    def _compress_groups(self, groups: list[_Group], skips: dict[int, Skip]) -> dict[tuple, tuple]:
        """Compress each (weight, orientation) once; skip the whole group when any part fails.

        The weights are compressed by ``dehm_onnx.parallel.compress_layers`` (``config.jobs``
        worker processes); results come back in task order, so the model does not depend on
        the number of workers.
        """
        tasks, owners = [], []
        for group in groups:
            live = [c for c in group.cands if id(c) not in skips]
            for key in dict.fromkeys(c.share_key for c in live):
                users = [c for c in live if c.share_key == key]
                tol = min(self._tol(c) for c in users)
                tasks.append(_task(users[0], tol, self.config))
                owners.append((live, key, tol))
        if self.progress is not None:
            self.progress.start(len(tasks))
        results = compress_layers(tasks, getattr(self.config, "jobs", 1), self._on_done)
        out: dict[tuple, tuple] = {}
        for (live, key, tol), result in zip(owners, results):
            if result.skip is not None:
                for cand in live:
                    skips.setdefault(id(cand), result.skip)
            else:
                out[key] = (result.hm, tol)
        return out

    def _on_done(self, task, result) -> None:
        if self.progress is not None:
            params = result.hm.params if result.hm is not None else result.dense_params
            self.progress.layer(task.name, int(params), int(result.dense_params))

    def _emit(self, cand: Candidate, hm, tol: float, names: set[str]):
        """Nodes replacing ``cand``: optional transpose of X, the emitter's ``x @ W_H``, then
        transpose / alpha / bias steps; returns ``(nodes, factors, local_inits, functions)``."""
        prefix = _unique_prefix(f"{cand.weight_name}.hm", names)
        dtype = cand.const.value.dtype
        pre = _pre_nodes(cand, prefix)
        x = pre[-1].output[0] if pre else cand.x_name
        steps = _post_steps(cand) + (["clamp"] if self._clamps(cand) else [])
        product = f"{prefix}/y_h" if steps else cand.output
        nodes, inits, functions = self.emitter(hm, x, product, prefix, dtype)
        post, local = _post_nodes(cand, steps, product, prefix, dtype)
        all_nodes = pre + list(nodes) + post
        _tag(all_nodes, cand, hm, tol)
        return all_nodes, list(inits), local, list(functions)

    def _clamps(self, cand: Candidate) -> bool:
        """Whether the layer's true output is provably ``>= 0`` (see the module docstring)."""
        if cand.graph_path != "main" or cand.alpha < 0:
            return False
        if cand.x_name not in self._nonneg:
            return False
        if cand.c_name and not (cand.beta >= 0 and cand.c_name in self._nonneg):
            return False
        weight = cand.const.value
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
            tol_out=self.config.tol_out if self.config.tol_out is not None else self.config.tol,
            certified_error=float(hm.rel_certified_error),
            params=int(hm.params),
            dense_params=int(hm.dense_params),
            blocks=hm.counts(),
            max_rank=int(hm.max_rank),
            permuted=hm.row_perm is not None or hm.col_perm is not None,
            emit=self.config.emit,
            nodes=node_count,
        )


def _pre_nodes(cand: Candidate, prefix: str) -> list[onnx.NodeProto]:
    """``Transpose(X)`` when the candidate's activation must be transposed, else nothing."""
    if not cand.trans_x:
        return []
    return [_transpose(cand.x_name, f"{prefix}/x_t", cand.x_rank, f"{prefix}/transpose_x")]


def _post_steps(cand: Candidate) -> list[str]:
    """What follows ``x @ W_H``, in order: transpose back, scale by alpha, add beta*C."""
    steps = []
    if cand.trans_y:
        steps.append("transpose")
    if cand.alpha != 1.0:
        steps.append("alpha")
    if cand.c_name:
        steps.append("bias")
    return steps


def _post_nodes(cand: Candidate, steps: list[str], current: str, prefix: str, dtype):
    """Nodes for ``steps`` starting from ``current``; the last writes the original output."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    for i, step in enumerate(steps):
        out = cand.output if i == len(steps) - 1 else f"{prefix}/{step}_out"
        if step == "transpose":
            nodes.append(_transpose(current, out, cand.x_rank, f"{prefix}/transpose_y"))
        elif step == "clamp":
            nodes.append(helper.make_node("Relu", [current], [out], name=f"{prefix}/clamp"))
        elif step == "alpha":
            inits.append(numpy_helper.from_array(np.asarray(cand.alpha, dtype=dtype), f"{prefix}/alpha"))
            nodes.append(helper.make_node("Mul", [current, f"{prefix}/alpha"], [out], name=f"{prefix}/mul_alpha"))
        else:
            bias = cand.c_name
            if cand.beta != 1.0:
                inits.append(numpy_helper.from_array(np.asarray(cand.beta, dtype=dtype), f"{prefix}/beta"))
                bias = f"{prefix}/beta_c"
                nodes.append(helper.make_node("Mul", [cand.c_name, f"{prefix}/beta"], [bias], name=f"{prefix}/mul_beta"))
            nodes.append(helper.make_node("Add", [current, bias], [out], name=f"{prefix}/add_bias"))
        current = out
    return nodes, inits


def _task(cand: Candidate, tol: float, config: OptimizeConfig) -> LayerTask:
    """The compression of the candidate's weight as a self-contained task.

    An external weight travels as its validated file slice and is memory-mapped by the
    worker; an in-memory weight travels as its array.
    """
    where = weight_slice(cand.const.tensor)
    source = where if where is not None else cand.const.value
    return LayerTask(cand.weight_name, source, cand.trans_w, tol, config.seed, config.max_ratio)


def _record(cand: Candidate, **fields) -> LayerRecord:
    """A report record with the candidate's identity (names, graph) and the given fields."""
    return LayerRecord(
        name=cand.name,
        op=cand.op,
        output=cand.output,
        weight=cand.weight_name,
        graph=cand.graph_path,
        weight_graph=cand.const.graph_path,
        **fields,
    )


def _skipped_record(cand: Candidate, skip: Skip) -> LayerRecord:
    shape = list(cand.weight.shape)
    dense = int(np.prod(shape)) if shape else 0
    return _record(
        cand,
        shape=shape,
        compressed=False,
        skip_reason=skip.reason.name,
        reason=skip.sentence,
        dense_params=dense,
    )


def select_candidates(model: onnx.ModelProto, config: OptimizeConfig):
    """Scan ``model`` and decide which candidates are skipped, and why.

    Returns:
        ``(candidates, groups, skips)``: every candidate in graph order, the candidates grouped
        by the constant they read (a shared weight is compressed once), and the skip of each
        skipped candidate keyed by ``id(candidate)``.
    """
    found = scan(model)
    if any(c.needs_x_rank for c in found.candidates):
        found = scan(model, activation_ranks(model))
    opset = _default_opset(model)
    skips: dict[int, Skip] = {}
    for cand in found.candidates:
        skip = check_candidate(cand, config, opset) or check_weight(cand, config)
        if skip:
            skips[id(cand)] = skip
    groups = _group_by_const(found.candidates)
    for group in groups:
        _skip_shared(group, skips)
    return found.candidates, groups, skips


def _group_by_const(cands: list[Candidate]) -> list[_Group]:
    groups: dict[int, _Group] = {}
    for cand in cands:
        groups.setdefault(id(cand.const), _Group(cand.const)).cands.append(cand)
    return list(groups.values())


def _skip_shared(group: _Group, skips: dict[int, Skip]) -> None:
    """Skip every user of a weight that some node or graph output keeps reading densely."""
    live = {id(c.node) for c in group.cands if id(c) not in skips}
    keepers = []
    for user in group.const.users:
        if id(user) not in live:
            keepers.append(user.name or user.op_type)
    for cand in group.cands:
        others = [n for i, n in enumerate(cand.node.input) if i != cand.weight_index]
        if cand.weight_name in others:
            keepers.append(cand.name)
    keepers += ["a graph output"] * group.const.output_uses
    if not keepers:
        return
    users = ", ".join(repr(k) for k in dict.fromkeys(keepers))
    for cand in group.cands:
        if id(cand) not in skips:
            skips[id(cand)] = Skip.of(SkipReason.SHARED_WEIGHT, weight=cand.weight_name, users=users)


def _transpose(x: str, y: str, rank: int | None, name: str) -> onnx.NodeProto:
    rank = rank or 2
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    return helper.make_node("Transpose", [x], [y], name=name, perm=perm)


def _tag(nodes: list[onnx.NodeProto], cand: Candidate, hm, tol: float) -> None:
    """Provenance: which node a new node replaces, with which bound."""
    for node in nodes:
        for key, value in (
            ("dehm.source_node", cand.name),
            ("dehm.tol", repr(float(tol))),
            ("dehm.certified_error", repr(float(hm.rel_certified_error))),
        ):
            entry = node.metadata_props.add()
            entry.key, entry.value = key, value


def _all_names(model: onnx.ModelProto) -> set[str]:
    names: set[str] = set()
    for graph, _ in iter_graphs(model.graph):
        names.update(i.name for i in graph.input)
        names.update(o.name for o in graph.output)
        names.update(t.name for t in graph.initializer)
        for node in graph.node:
            names.update(node.output)
            names.update(node.input)
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


def _reuse_initializers(nodes, inits, shared) -> None:
    """Point ``nodes`` at the initializers of the first emission of the same weight."""
    assert len(inits) == len(shared), "Bug: emitters must be deterministic for shared weights"
    rename = {new.name: old.name for new, old in zip(inits, shared)}
    for node in nodes:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]


def _splice(model, cand: Candidate, nodes, factors, local, functions) -> None:
    """Replace ``cand.node`` by ``nodes`` at its position; add initializers and functions.

    The factors live beside the weight they replace (so a subgraph node can share an
    outer-scope weight's factors); the Gemm scalars live beside the node.
    """
    graph = cand.graph
    index = next(i for i, n in enumerate(graph.node) if list(n.output) == [cand.output])
    del graph.node[index]
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)
    cand.const.graph.initializer.extend(factors)
    graph.initializer.extend(local)
    _add_functions(model, functions)
    _add_domains(model, nodes)


def _add_functions(model, functions) -> None:
    have = {(f.domain, f.name, getattr(f, "overload", "")) for f in model.functions}
    for fn in functions:
        key = (fn.domain, fn.name, getattr(fn, "overload", ""))
        if key not in have:
            fit_function_to_model(model, fn)  # opsets and IR version (emit_function)
            model.functions.append(fn)
            have.add(key)


def _add_domains(model, nodes) -> None:
    have = {o.domain for o in model.opset_import}
    for node in nodes:
        if node.domain not in ("", "ai.onnx") and node.domain not in have:
            model.opset_import.append(helper.make_opsetid(node.domain, 1))
            have.add(node.domain)


def _remove_constant(const: ConstRef) -> None:
    """Drop a weight that every user stopped reading, with its ``value_info`` entry."""
    graph = const.graph
    if const.node is not None:
        index = next(i for i, n in enumerate(graph.node) if list(n.output) == [const.name])
        del graph.node[index]
    else:
        index = next(i for i, t in enumerate(graph.initializer) if t.name == const.name)
        del graph.initializer[index]
    for index in reversed([i for i, v in enumerate(graph.value_info) if v.name == const.name]):
        del graph.value_info[index]


def _default_opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    return 0


def read_layers(model: onnx.ModelProto) -> list[dict]:
    """The ``dehm.layers`` metadata of an optimized model (empty list when absent)."""
    for prop in model.metadata_props:
        if prop.key == LAYERS_KEY:
            return json.loads(prop.value)
    return []


def _write_metadata(model: onnx.ModelProto, report: Report) -> None:
    """Append the compressed layers to ``dehm.layers`` and set ``dehm.version``."""
    layers = read_layers(model) + [r.metadata_entry() for r in report.compressed]
    values = {LAYERS_KEY: json.dumps(layers), VERSION_KEY: __version__}
    for prop in model.metadata_props:
        if prop.key in values:
            prop.value = values.pop(prop.key)
    for key, value in values.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
