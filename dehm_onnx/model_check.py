"""The ONNX checker, no stricter on input models than onnxruntime is.

onnxruntime loads and runs some models that ``onnx.checker.check_model`` refuses; exporters
write such models (skl2onnx leaves the shape of ``GaussianProcessRegressor(return_std=True)``'s
std output undeclared). When the checker refuses a model, ``check_model`` looks for the
defects below; if the model passes the checker once they are repaired (in a copy used only
for the check), it is accepted and the defects are returned so that the caller can say what
was tolerated. Each was measured to fail ``onnx.checker`` (onnx 1.23) and to load and run in
onnxruntime (1.32):

- a main-graph input or output whose type has no shape, or no type at all;
- an empty graph name;
- nodes out of topological order (onnxruntime sorts them);
- IR version < 4 with initializers that are not graph inputs;
- a ``metadata_props`` key given twice.

Anything else the checker refuses is refused. The tool's own output is checked with
``carried=`` the input's defects: it may keep those (the rewrite leaves inputs, outputs,
names and node order alone), never add one.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import onnx

from .errors import InvalidModelError

__all__ = ["Defect", "check_model", "find_defects", "repaired_copy"]


@dataclass(frozen=True)
class Defect:
    """A checker complaint that onnxruntime does not share.

    Attributes:
        kind: one of ``NO_SHAPE``, ``NO_TYPE``, ``NO_GRAPH_NAME``, ``UNSORTED``,
            ``INITIALIZER_NOT_INPUT``, ``DUPLICATE_METADATA``.
        subject: the tensor, graph or metadata key concerned ("" for the whole model).
    """

    kind: str
    subject: str = ""

    def describe(self) -> str:
        """One sentence saying what was tolerated."""
        s = self.subject
        text = {
            "NO_SHAPE": f"graph {s} declares no shape",
            "NO_TYPE": f"graph {s} declares no type",
            "NO_GRAPH_NAME": "the main graph has no name",
            "UNSORTED": f"the nodes of {s} are not in topological order",
            "INITIALIZER_NOT_INPUT": "initializers are not graph inputs (IR version < 4)",
            "DUPLICATE_METADATA": f"metadata key {s!r} is given more than once",
        }[self.kind]
        return f"tolerated: {text} (the ONNX checker refuses this, onnxruntime does not)"


def _io_defects(graph: onnx.GraphProto) -> list[Defect]:
    defects = []
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for value in values:
            subject = f"{kind} {value.name!r}"
            if not value.HasField("type"):
                defects.append(Defect("NO_TYPE", subject))
            elif value.type.HasField("tensor_type") and not value.type.tensor_type.HasField("shape"):
                defects.append(Defect("NO_SHAPE", subject))
    return defects


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    graphs = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            graphs.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            graphs.extend(attr.graphs)
    return graphs


def _free_names(graph: onnx.GraphProto) -> set[str]:
    """Names a graph reads from enclosing scopes."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.name for t in graph.sparse_initializer if t.values.name}
    used: set[str] = set()
    for node in graph.node:
        used.update(name for name in node.input if name)
        for sub in _subgraphs(node):
            used |= _free_names(sub)
        defined.update(node.output)
    return used - defined


def _node_uses(node: onnx.NodeProto) -> set[str]:
    uses = {name for name in node.input if name}
    for sub in _subgraphs(node):
        uses |= _free_names(sub)
    return uses


def _topological_order(graph: onnx.GraphProto) -> list[int] | None:
    """Node indices in a topological order (stable), or None if the graph is already sorted.

    A node depends on the nodes of the same graph producing its inputs or the outer-scope
    names its subgraphs read; names produced nowhere in the graph do not constrain the order
    (the checker reports those itself).
    """
    producer = {}
    for index, node in enumerate(graph.node):
        for name in node.output:
            if name:
                producer.setdefault(name, index)
    deps = [{producer[n] for n in _node_uses(node) if n in producer and producer[n] != i} for i, node in enumerate(graph.node)]
    if all(d < i for i, ds in enumerate(deps) for d in ds):
        return None
    users: list[list[int]] = [[] for _ in deps]
    waiting = [len(ds) for ds in deps]
    for i, ds in enumerate(deps):
        for d in ds:
            users[d].append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for user in users[i]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, user)
    if len(order) < len(deps):
        return None  # a cycle: not a sorting problem, the checker's message stands
    return order


def _graphs(graph: onnx.GraphProto, path: str):
    yield graph, path
    for node in graph.node:
        for k, sub in enumerate(_subgraphs(node)):
            yield from _graphs(sub, f"{path}/{node.name or node.op_type}[{k}]")


def find_defects(model: onnx.ModelProto) -> list[Defect]:
    """The tolerated defects present in ``model`` (see the module docstring)."""
    graph = model.graph
    defects = _io_defects(graph)
    if not graph.name:
        defects.append(Defect("NO_GRAPH_NAME"))
    for sub, path in _graphs(graph, "main"):
        if _topological_order(sub) is not None:
            defects.append(Defect("UNSORTED", "the main graph" if path == "main" else f"subgraph {path!r}"))
    if model.ir_version < 4:
        inputs = {v.name for v in graph.input}
        if any(t.name not in inputs for t in graph.initializer):
            defects.append(Defect("INITIALIZER_NOT_INPUT"))
    keys = [p.key for p in model.metadata_props]
    for key in dict.fromkeys(keys):
        if keys.count(key) > 1:
            defects.append(Defect("DUPLICATE_METADATA", key))
    return defects


def _sort_all(graph: onnx.GraphProto) -> None:
    for node in graph.node:
        for sub in _subgraphs(node):
            _sort_all(sub)
    order = _topological_order(graph)
    if order is not None:
        nodes = [onnx.NodeProto() for _ in order]
        for target, index in zip(nodes, order):
            target.CopyFrom(graph.node[index])
        del graph.node[:]
        graph.node.extend(nodes)


def repaired_copy(model: onnx.ModelProto, defects: list[Defect]) -> onnx.ModelProto:
    """A copy of ``model`` with ``defects`` repaired, for the checker only (never written)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    kinds = {d.kind for d in defects}
    # With full_check off the checker does not infer shapes, so a placeholder type is neutral.
    for value in list(graph.input) + list(graph.output):
        if not value.HasField("type"):
            value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        if value.type.HasField("tensor_type") and not value.type.tensor_type.HasField("shape"):
            value.type.tensor_type.shape.SetInParent()
    if "NO_GRAPH_NAME" in kinds:
        graph.name = "main"
    if "UNSORTED" in kinds:
        _sort_all(graph)
    if "INITIALIZER_NOT_INPUT" in kinds:
        inputs = {v.name for v in graph.input}
        for tensor in graph.initializer:
            if tensor.name not in inputs:
                graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    if "DUPLICATE_METADATA" in kinds:
        seen = set()
        kept = [p for p in copy.metadata_props if not (p.key in seen or seen.add(p.key))]
        del copy.metadata_props[:]
        copy.metadata_props.extend(kept)
    return copy


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_model(model: onnx.ModelProto, what: str, carried: list[Defect] | None = None) -> list[Defect]:
    """Run ``onnx.checker``; return the tolerated defects it found (empty when it passes).

    Args:
        model: the model (its tensors in memory or as checkable stubs).
        what: how messages name it ("model 'in.onnx'").
        carried: for a model the tool wrote, the defects its input had; any other defect
            is an error.

    Raises:
        InvalidModelError: the checker refuses something not tolerated; the message is the
            checker's first line.
    """
    try:
        onnx.checker.check_model(model)
        return []
    except onnx.checker.ValidationError as e:
        first = e
    defects = find_defects(model)
    new = [d for d in defects if carried is not None and d not in carried]
    if not defects or new:
        raise InvalidModelError(f"{what} fails the ONNX checker: {_first_line(first)}") from first
    try:
        onnx.checker.check_model(repaired_copy(model, defects))
    except onnx.checker.ValidationError as e:
        raise InvalidModelError(f"{what} fails the ONNX checker: {_first_line(e)}") from e
    return defects
