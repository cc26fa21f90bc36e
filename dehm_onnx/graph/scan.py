"""Find MatMul/Gemm nodes with a constant weight, in the main graph and in every subgraph.

A weight is constant when its input has a ``WeightSource`` (``sources.py``): an initializer
or ``Constant`` output, possibly through dequantize/cast/scale/reshape/transpose/identity
steps, in the node's own graph or any enclosing one (``If``/``Loop``/``Scan`` bodies see
outer-scope names). Every candidate is described in the ``Y = X @ W`` orientation:

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
applied after the product (``alpha`` is not folded into W, so W keeps its values).
Nodes emitted by dehm_onnx (tagged with ``dehm.*`` metadata) are never candidates, which
makes the pass idempotent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from .sources import WeightSource, find_source

__all__ = [
    "PROVENANCE_PREFIX",
    "Candidate",
    "Scan",
    "scan",
    "is_emitted",
    "graph_paths",
    "activation_ranks",
    "first_non_text_name",
]

logger = logging.getLogger(__name__)

PROVENANCE_PREFIX = "dehm."
_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(eq=False)
class Candidate:
    """A MatMul/Gemm node whose weight is constant, in ``Y = X @ W`` orientation.

    ``trans_w``: W is the source's value transposed. ``trans_x``/``trans_y``: the activation
    is transposed (last two axes) before, and the product after, the ``X @ W`` part.
    ``alpha``, ``beta``, ``c``: Gemm's scale and bias (``c`` None when absent).
    """

    node: ir.Node
    graph_path: str
    weight_graph: str
    name: str
    op: str
    x: ir.Value
    source: WeightSource
    weight_index: int = 1
    trans_w: bool = False
    trans_x: bool = False
    trans_y: bool = False
    x_rank: int | None = None
    needs_x_rank: bool = False
    alpha: float = 1.0
    beta: float = 1.0
    c: ir.Value | None = None

    @property
    def graph(self) -> ir.Graph:
        return self.node.graph

    @property
    def output(self) -> str:
        return self.node.outputs[0].name

    @property
    def x_name(self) -> str:
        return self.x.name

    @property
    def c_name(self) -> str:
        return self.c.name if self.c is not None else ""

    @property
    def weight_name(self) -> str:
        return self.source.name

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of W (``Y = X @ W`` orientation), known without reading the weight."""
        return self.source.shape[::-1] if self.trans_w else self.source.shape

    @property
    def weight(self) -> np.ndarray:
        """W in the ``Y = X @ W`` orientation (reads the weight)."""
        w = self.source.array()
        return w.T if self.trans_w else w

    @property
    def share_key(self) -> tuple:
        """Candidates with equal keys use the same compressed W."""
        return self.source.share_key + (self.trans_w,)


@dataclass
class Scan:
    """Result of ``scan``: candidates in graph order (outer graphs first at each node)."""

    candidates: list[Candidate]


def is_emitted(node) -> bool:
    """True for nodes written by dehm_onnx (provenance metadata); ir or proto nodes."""
    props = node.metadata_props
    keys = props.keys() if isinstance(props, dict) else (p.key for p in props)
    return any(k.startswith(PROVENANCE_PREFIX) for k in keys)


def graph_paths(graph: ir.Graph) -> dict[int, str]:
    """``id(graph) -> path`` for ``graph`` (``"main"``) and every subgraph below it."""
    paths = {id(graph): "main"}
    for node in ir.traversal.RecursiveGraphIterator(graph):
        base = f"{paths[id(node.graph)]}/{node.name or node.op_type}"
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                paths[id(attr.value)] = f"{base}.{attr.name}"
            elif attr.type == ir.AttributeType.GRAPHS:
                for i, sub in enumerate(attr.value):
                    paths[id(sub)] = f"{base}.{attr.name}[{i}]"
    return paths


def first_non_text_name(model: ir.Model):
    """The first name that is not valid UTF-8 (protobuf hands those over as bytes), or None.

    The ONNX checker accepts such names, but they cannot be compared with, or written next
    to, the names the pass creates.
    """
    texts = list(model.opset_imports) + [t for kv in model.metadata_props.items() for t in kv]
    for graph in model.graphs():
        texts += [v.name for v in (*graph.inputs, *graph.outputs, *graph.initializers.values())]
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        texts += [node.name, node.op_type, node.domain]
        texts += [v.name for v in (*node.inputs, *node.outputs) if v is not None]
    return next((t for t in texts if t is not None and not isinstance(t, str)), None)


def activation_ranks(model) -> dict[str, int]:
    """Ranks of the tensors whose shapes are known after ONNX shape inference.

    Accepts an ``onnx.ModelProto`` or an ``ir.Model``; inference runs on a copy whose
    large tensors are left out (``dehm_onnx.model_io.light_proto``).
    """
    from ..model_io import light_proto

    proto = model if isinstance(model, onnx.ModelProto) else light_proto(model)
    ranks: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is best effort; unknown ranks skip layers
        inferred = proto
    inferred_model = ir.serde.deserialize_model(inferred)
    for graph in inferred_model.graphs():
        values = [*graph.inputs, *graph.outputs, *graph.initializers.values()]
        values += [out for node in graph for out in node.outputs]
        for value in values:
            if value.shape is not None and value.name:
                ranks[value.name] = len(value.shape)
    return ranks


def _float_attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return float(attr.value) if attr is not None else default


def _candidate(node: ir.Node, paths: dict[int, str], ranks: dict[str, int] | None) -> Candidate | None:
    if node.domain not in _DEFAULT_DOMAINS or node.op_type not in ("MatMul", "Gemm") or is_emitted(node):
        return None
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None or len(node.outputs) != 1:
        return None
    a, b = find_source(node.inputs[0]), find_source(node.inputs[1])
    weight = b if b is not None else a
    if weight is None:
        return None
    common = dict(
        node=node,
        graph_path=paths[id(node.graph)],
        weight_graph=paths.get(id(weight.graph), "main"),
        name=node.name or f"{node.op_type}({node.outputs[0].name})",
    )
    if node.op_type == "MatMul":
        return _matmul(node, a, b, common, ranks)
    return _gemm(node, a, b, common)


def _rank(value: ir.Value, ranks: dict[str, int] | None) -> int | None:
    if value.shape is not None:
        return len(value.shape)
    return None if ranks is None else ranks.get(value.name)


def _matmul(node, a, b, common, ranks) -> Candidate | None:
    if b is not None:
        return Candidate(op="MatMul", x=node.inputs[0], source=b, **common)
    if a is not None:
        x = node.inputs[1]
        rank = _rank(x, ranks)
        swap = rank is None or rank >= 2
        return Candidate(
            op="MatMul", x=x, source=a, weight_index=0, trans_w=True, trans_x=swap, trans_y=swap,
            x_rank=rank, needs_x_rank=True, **common,
        )
    return None


def _gemm(node, a, b, common) -> Candidate | None:
    trans_a = bool(node.attributes.get_int("transA", 0))
    trans_b = bool(node.attributes.get_int("transB", 0))
    gemm = dict(
        op="Gemm",
        alpha=_float_attr(node, "alpha", 1.0),
        beta=_float_attr(node, "beta", 1.0),
        c=node.inputs[2] if len(node.inputs) > 2 else None,
        x_rank=2,
    )
    if b is not None:
        return Candidate(x=node.inputs[0], source=b, trans_w=trans_b, trans_x=trans_a, **gemm, **common)
    if a is not None:
        # Y = op(A) op(B)  <=>  Yᵀ = op(B)ᵀ op(A)ᵀ
        return Candidate(
            x=node.inputs[1], source=a, weight_index=0, trans_w=not trans_a, trans_x=not trans_b, trans_y=True,
            **gemm, **common,
        )
    return None


def scan(model, ranks: dict[str, int] | None = None) -> Scan:
    """Candidates of ``model`` (an ``ir.Model`` or ``onnx.ModelProto``; not modified).

    Args:
        model: the model to read.
        ranks: tensor name -> rank; computed by ONNX shape inference when a ``MatMul(W, X)``
            needs the rank of an X whose shape the model does not state.
    """
    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)
    paths = graph_paths(model.graph)
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    found = [c for c in (_candidate(n, paths, ranks) for n in nodes) if c is not None]
    if ranks is None and any(c.needs_x_rank and c.x_rank is None for c in found):
        return scan(model, activation_ranks(model))
    return Scan(found)
