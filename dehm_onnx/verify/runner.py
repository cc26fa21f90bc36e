"""Run ONNX models in onnxruntime (CPU) with chosen intermediate tensors exposed as outputs.

Intermediate tensors are exposed by appending them to a *copy* of the model's graph outputs,
typed from the model's value_info or from ONNX shape inference (untyped if neither knows;
onnxruntime accepts that). Only main-graph tensors can be exposed: a tensor produced inside an
If/Loop/Scan body is skipped with a note, as is a name that no node produces.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from ..errors import InvalidModelError

__all__ = [
    "release_memory",
    "CalibrationRunError",
    "ExposedModel",
    "expose_outputs",
    "extract_layer_model",
    "make_cpu_session",
    "run_samples",
]

logger = logging.getLogger(__name__)


def _nested_outputs(model) -> set:
    """Names produced inside If/Loop/Scan bodies (onnx-ir's recursive iterator)."""
    import onnx_ir as ir

    main = ir.serde.deserialize_model(model).graph
    return {v.name for node in ir.traversal.RecursiveGraphIterator(main) if node.graph is not main for v in node.outputs}


def _produced_in(graph) -> set:
    return {out for node in graph.node for out in node.output if out}


class ExposedModel:
    """A model copy with extra graph outputs, and what could not be exposed.

    Attributes:
        model: the modified copy.
        exposed: names now available as outputs (in the order asked).
        notes: one sentence per name that was skipped.
    """

    def __init__(self, model, exposed: list, notes: list):
        self.model = model
        self.exposed = exposed
        self.notes = notes


def _typed_value_infos(model) -> dict:
    import onnx

    infos = {v.name: v for v in list(model.graph.value_info) + list(model.graph.output)}
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        for v in inferred.graph.value_info:
            infos.setdefault(v.name, v)
    except Exception as e:  # inference is a convenience here; untyped outputs still run
        logger.info("shape inference failed (%s); exposing untyped outputs", e)
    return infos


def expose_outputs(model, names: Iterable[str]) -> ExposedModel:
    """Return a copy of ``model`` whose graph outputs also include ``names`` (main graph only)."""
    import onnx

    model = copy.deepcopy(model)
    graph = model.graph
    present = {o.name for o in graph.output}
    main = _produced_in(graph) | {i.name for i in graph.input} | {t.name for t in graph.initializer}
    nested = None
    infos = None
    exposed, notes = [], []
    for name in dict.fromkeys(names):
        if name in present:
            exposed.append(name)
            continue
        if name not in main:
            nested = _nested_outputs(model) if nested is None else nested
            where = "inside a subgraph (If/Loop/Scan body)" if name in nested else "nowhere in the model"
            notes.append(f"tensor {name!r} is produced {where}; not checked")
            continue
        if infos is None:
            infos = _typed_value_infos(model)
        value = copy.deepcopy(infos[name]) if name in infos else onnx.ValueInfoProto(name=name)
        graph.output.append(value)
        present.add(name)
        exposed.append(name)
    return ExposedModel(model, exposed, notes)


def make_cpu_session(model, quiet: bool = False):
    """An onnxruntime CPU session for a ModelProto, as verification needs it.

    ``dehm_onnx.ops.library.make_session`` with ``kernel="if_needed"``: stock onnxruntime,
    and the compiled HMatMul library only for ``HMatMul`` nodes it cannot run (emit ``custom``).
    A model that keeps its weights in external files (``api.optimize_file``) is handed over
    as bytes with the folder of the enclosing ``model_io.weights_from`` block: onnxruntime
    maps the weights from their files (``make_session``'s ``data_folder``). ``quiet``
    silences onnxruntime's own error log (for runs that are allowed to fail).

    Raises:
        InvalidModelError: onnxruntime refuses the model, or it has external tensors and no
            folder is known.
    """
    from ..model_io import session_data_folder
    from ..ops.library import make_session

    return make_session(model, kernel="if_needed", quiet=quiet, data_folder=session_data_folder(model))


def release_memory() -> None:
    """Hand freed memory back to the OS (Linux glibc; elsewhere only a garbage collection).

    Sessions, trial compressions and statistics of a verification step are freed when it
    ends, but glibc keeps freed heap blocks for reuse. Called before the original model runs
    again with every weight mapped, so that what earlier steps left does not add to the peak.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


class CalibrationRunError(InvalidModelError):
    """onnxruntime failed on a calibration sample; ``which`` names the model ("original", ...)."""

    def __init__(self, message: str, which: str):
        super().__init__(message)
        self.which = which


def run_samples(session, samples: Iterable[dict], outputs: Sequence[str], which: str = "the") -> Iterator[dict]:
    """Run ``session`` on each feed dict and yield {output name: array} per sample.

    Raises:
        CalibrationRunError: onnxruntime fails on a sample (shape or dtype mismatch, ...).
    """
    outputs = list(outputs)
    for index, feed in enumerate(samples):
        try:
            values = session.run(outputs, feed)
        except Exception as e:
            raise CalibrationRunError(
                f"onnxruntime failed running {which} model on calibration sample {index}: {str(e).splitlines()[0]}",
                which,
            ) from e
        yield dict(zip(outputs, values))


def extract_layer_model(model, x_name: str, y_name: str, x_dtype):
    """The main-graph nodes of ``model`` that compute ``y_name`` from ``x_name`` as a model.

    ``x_dtype`` (numpy dtype) types the new graph input; shapes are left free.

    Walks back from ``y_name`` through producers until ``x_name``, initializers or constants;
    returns None if the path depends on any other graph input or crosses a subgraph node
    (the layer then cannot be run in isolation).
    """
    import onnx

    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output if out}
    initializers = {t.name: t for t in graph.initializer}
    graph_inputs = {i.name for i in graph.input} - set(initializers)
    needed_nodes, needed_inits, stack, seen = set(), set(), [y_name], set()
    found_x = False
    while stack:
        name = stack.pop()
        if name == x_name:
            found_x = True
            continue
        if name in seen or not name:
            continue
        seen.add(name)
        if name in initializers:
            needed_inits.add(name)
            continue
        if name in graph_inputs or name not in producer:
            return None
        node = producer[name]
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return None
        needed_nodes.add(id(node))
        stack.extend(node.input)
    if not found_x:
        return None
    elem_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(x_dtype))
    nodes = [n for n in graph.node if id(n) in needed_nodes]
    layer_graph = onnx.helper.make_graph(
        nodes,
        f"layer_{y_name}",
        [onnx.helper.make_tensor_value_info(x_name, elem_type, None)],
        [onnx.ValueInfoProto(name=y_name)],
        [initializers[n] for n in sorted(needed_inits)],
    )
    layer = onnx.helper.make_model(
        layer_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version
    )
    layer.functions.extend(_functions_used(model, nodes))
    return layer


def _functions_used(model, nodes) -> list:
    """The model-local functions that ``nodes`` call, directly or through other functions.

    Only those go into a layer model: with ``--emit function`` every layer's factors live in
    its own function, so copying them all into each of n layer models would hold n times
    the compressed model in memory.
    """
    by_key = {(f.domain, f.name, getattr(f, "overload", "")): f for f in model.functions}
    used, stack = {}, list(nodes)
    while stack:
        node = stack.pop()
        key = (node.domain, node.op_type, getattr(node, "overload", ""))
        if key in by_key and key not in used:
            used[key] = by_key[key]
            stack.extend(by_key[key].node)
    return [f for key, f in by_key.items() if key in used]
