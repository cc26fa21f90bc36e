"""Find MatMul/Gemm nodes with a constant weight, in the main graph and in every subgraph.

A constant is an initializer or the output of a ``Constant`` node (attribute ``value``), in
the node's own graph or any enclosing one (``If``/``Loop``/``Scan`` bodies see outer-scope
names). Every candidate is described in the ``Y = X @ W`` orientation:

==========================  =========================  ==============================
node                        X (activation)             W (compressed)
==========================  =========================  ==============================
MatMul(X, B const)          X                          B
MatMul(A const, X), X 1-D   X                          Aᵀ
MatMul(A const, X), X r-D   swap of X's last two axes  Aᵀ, and Y is swapped back
Gemm(A, B const)            op(A)                      op(B) (Bᵀ when transB)
Gemm(A const, B)            op(B)ᵀ                     op(A)ᵀ, and Y is transposed
==========================  =========================  ==============================

``op(M)`` is ``M`` or ``Mᵀ`` by ``transA``/``transB``; Gemm's ``alpha`` and ``beta * C`` are
applied after the product (``alpha`` is not folded into W, so W keeps its stored values).
Nodes emitted by dehm_onnx (tagged with ``dehm.*`` metadata) are never candidates, which
makes the pass idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .external import tensor_array, uses_external_data

__all__ = [
    "ConstRef",
    "Candidate",
    "Scan",
    "scan",
    "is_emitted",
    "iter_graphs",
    "activation_ranks",
    "first_non_text_name",
]

PROVENANCE_PREFIX = "dehm."


@dataclass(eq=False)
class ConstRef:
    """A constant tensor and where it lives.

    Attributes:
        name: tensor name.
        graph: the graph that defines it (initializer list or ``Constant`` node).
        graph_path: ``"main"`` or the subgraph path.
        tensor: its ``TensorProto``.
        node: the ``Constant`` node defining it, or ``None`` for an initializer.
        is_graph_input: the initializer is also listed as an input of its graph.
        users: nodes (in any graph) that read it.
        output_uses: how many graph outputs name it directly.
    """

    name: str
    graph: onnx.GraphProto
    graph_path: str
    tensor: onnx.TensorProto
    node: onnx.NodeProto | None = None
    is_graph_input: bool = False
    users: list = field(default_factory=list)
    output_uses: int = 0
    _value: np.ndarray | None = None

    @property
    def value(self) -> np.ndarray:
        """The tensor as an ndarray (loaded once; external data is memory-mapped on each use)."""
        if self._value is not None:
            return self._value
        value = tensor_array(self.tensor)
        # A memory-mapped weight is not kept: its pages would stay resident until the end.
        if not isinstance(value, np.memmap):
            self._value = value
        return value

    @property
    def is_external(self) -> bool:
        """The tensor's values live in an external data file (read only when compressed)."""
        return uses_external_data(self.tensor)


@dataclass(eq=False)
class Candidate:
    """A MatMul/Gemm node whose weight is constant, in ``Y = X @ W`` orientation.

    ``trans_w``: W is the constant transposed. ``trans_x``/``trans_y``: the activation is
    transposed (last two axes) before, and the product after, the ``X @ W`` part.
    ``alpha``, ``beta``, ``c_name``: Gemm's scale and bias (``c_name`` empty when absent).
    """

    node: onnx.NodeProto
    graph: onnx.GraphProto
    graph_path: str
    name: str
    op: str
    output: str
    x_name: str
    const: ConstRef
    weight_index: int = 1
    trans_w: bool = False
    trans_x: bool = False
    trans_y: bool = False
    x_rank: int | None = None
    needs_x_rank: bool = False
    alpha: float = 1.0
    beta: float = 1.0
    c_name: str = ""

    @property
    def weight_name(self) -> str:
        return self.const.name

    @property
    def weight(self) -> np.ndarray:
        """W in the ``Y = X @ W`` orientation."""
        w = self.const.value
        return w.T if self.trans_w else w

    @property
    def share_key(self) -> tuple:
        """Candidates with equal keys use the same compressed W."""
        return (id(self.const), self.trans_w)


@dataclass
class Scan:
    """Result of ``scan``: candidates in graph order and every constant found."""

    candidates: list[Candidate]
    constants: list[ConstRef]


def is_emitted(node: onnx.NodeProto) -> bool:
    """True for nodes written by dehm_onnx (provenance metadata)."""
    return any(p.key.startswith(PROVENANCE_PREFIX) for p in node.metadata_props)


def iter_graphs(graph: onnx.GraphProto, path: str = "main"):
    """Yield ``(graph, path)`` for ``graph`` and every nested subgraph, outermost first."""
    yield graph, path
    for node in graph.node:
        for attr in node.attribute:
            for i, sub in enumerate(_subgraphs(attr)):
                suffix = attr.name if attr.type == onnx.AttributeProto.GRAPH else f"{attr.name}[{i}]"
                yield from iter_graphs(sub, f"{path}/{node.name or node.op_type}.{suffix}")


def _subgraphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    if attr.type == onnx.AttributeProto.GRAPH:
        return [attr.g]
    if attr.type == onnx.AttributeProto.GRAPHS:
        return list(attr.graphs)
    return []


def first_non_text_name(model: onnx.ModelProto):
    """The first name that is not valid UTF-8 (protobuf hands those over as bytes), or None.

    The ONNX checker accepts such names, but they cannot be compared with, or written next
    to, the names the pass creates.
    """
    texts = [o.domain for o in model.opset_import]
    texts += [t for p in model.metadata_props for t in (p.key, p.value)]
    for graph, _ in iter_graphs(model.graph):
        texts += [v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info)]
        texts += [t.name for t in graph.initializer]
        for node in graph.node:
            texts += [node.name, node.op_type, node.domain, *node.input, *node.output]
    return next((t for t in texts if not isinstance(t, str)), None)


def activation_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Ranks of the tensors whose shapes are known after ONNX shape inference."""
    ranks: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is best effort; unknown ranks skip layers
        inferred = model
    for graph, _ in iter_graphs(inferred.graph):
        for info in list(graph.value_info) + list(graph.input) + list(graph.output):
            t = info.type.tensor_type
            if info.type.HasField("tensor_type") and t.HasField("shape"):
                ranks[info.name] = len(t.shape.dim)
        for init in graph.initializer:
            ranks[init.name] = len(init.dims)
    return ranks


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
            return attr.t
    return None


def _attr(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


class _Scanner:
    def __init__(self, ranks: dict[str, int]):
        self.ranks = ranks
        self.candidates: list[Candidate] = []
        self.constants: list[ConstRef] = []

    def walk(self, graph: onnx.GraphProto, path: str, scopes: list[dict]) -> None:
        scope = self._define(graph, path)
        scopes = scopes + [scope]
        for node in graph.node:
            self._record_uses(node, scopes)
            self._maybe_candidate(node, graph, path, scopes)
            for attr in node.attribute:
                for i, sub in enumerate(_subgraphs(attr)):
                    suffix = attr.name if attr.type == onnx.AttributeProto.GRAPH else f"{attr.name}[{i}]"
                    self.walk(sub, f"{path}/{node.name or node.op_type}.{suffix}", scopes)
        for out in graph.output:
            ref = _resolve(out.name, scopes)
            if ref is not None:
                ref.output_uses += 1

    def _define(self, graph: onnx.GraphProto, path: str) -> dict:
        scope: dict[str, ConstRef | None] = {}
        inputs = {i.name for i in graph.input}
        for name in inputs:
            scope[name] = None
        for node in graph.node:
            for out in node.output:
                scope[out] = None
        for init in graph.initializer:
            ref = ConstRef(init.name, graph, path, init, is_graph_input=init.name in inputs)
            scope[init.name] = ref
            self.constants.append(ref)
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
                tensor = _constant_tensor(node)
                if tensor is not None:
                    ref = ConstRef(node.output[0], graph, path, tensor, node=node)
                    scope[node.output[0]] = ref
                    self.constants.append(ref)
        return scope

    @staticmethod
    def _record_uses(node: onnx.NodeProto, scopes: list[dict]) -> None:
        for name in node.input:
            ref = _resolve(name, scopes) if name else None
            if ref is not None:
                ref.users.append(node)

    def _maybe_candidate(self, node, graph, path, scopes) -> None:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm") or is_emitted(node):
            return
        if len(node.input) < 2 or not all(node.input[:2]) or len(node.output) != 1 or not node.output[0]:
            return
        a, b = (_resolve(n, scopes) for n in node.input[:2])
        common = dict(node=node, graph=graph, graph_path=path, output=node.output[0])
        common["name"] = node.name or f"{node.op_type}({node.output[0]})"
        if node.op_type == "MatMul":
            cand = self._matmul(node, a, b, common)
        else:
            cand = self._gemm(node, a, b, common)
        if cand is not None:
            self.candidates.append(cand)

    def _matmul(self, node, a, b, common) -> Candidate | None:
        if b is not None:
            return Candidate(op="MatMul", x_name=node.input[0], const=b, **common)
        if a is not None:
            x = node.input[1]
            rank = self.ranks.get(x)
            swap = rank is None or rank >= 2
            return Candidate(
                op="MatMul", x_name=x, const=a, weight_index=0, trans_w=True, trans_x=swap, trans_y=swap,
                x_rank=rank, needs_x_rank=True, **common,
            )
        return None

    def _gemm(self, node, a, b, common) -> Candidate | None:
        trans_a = bool(_attr(node, "transA", 0))
        trans_b = bool(_attr(node, "transB", 0))
        gemm = dict(
            op="Gemm",
            alpha=float(_attr(node, "alpha", 1.0)),
            beta=float(_attr(node, "beta", 1.0)),
            c_name=node.input[2] if len(node.input) > 2 else "",
            x_rank=2,
        )
        if b is not None:
            return Candidate(x_name=node.input[0], const=b, trans_w=trans_b, trans_x=trans_a, **gemm, **common)
        if a is not None:
            # Y = op(A) op(B)  <=>  Yᵀ = op(B)ᵀ op(A)ᵀ
            return Candidate(
                x_name=node.input[1], const=a, weight_index=0, trans_w=not trans_a, trans_x=not trans_b, trans_y=True,
                **gemm, **common,
            )
        return None


def _resolve(name: str, scopes: list[dict]) -> ConstRef | None:
    for scope in reversed(scopes):
        if name in scope:
            return scope[name]
    return None


def scan(model: onnx.ModelProto, ranks: dict[str, int] | None = None) -> Scan:
    """Candidates (graph order, outer graphs first) and constants of ``model``.

    Args:
        model: the model to read (not modified).
        ranks: tensor name -> rank, e.g. from ``activation_ranks``; needed only for
            ``MatMul(W, X)`` nodes, which are skipped when X's rank is unknown.
    """
    scanner = _Scanner(ranks or {})
    scanner.walk(model.graph, "main", [])
    return Scan(scanner.candidates, scanner.constants)
