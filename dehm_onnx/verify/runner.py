"""Run ONNX models in onnxruntime (CPU) with chosen intermediate tensors exposed as outputs.

Intermediate tensors are exposed by appending them to a *copy* of the model's graph outputs,
typed from the model's value_info or from ONNX shape inference (untyped if neither knows;
onnxruntime accepts that). Only main-graph tensors can be exposed: a tensor produced inside an
If/Loop/Scan body is skipped with a note, as is a name that no node produces.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from ..errors import InvalidModelError

__all__ = [
    "release_memory",
    "CalibrationRunError",
    "ExposedModel",
    "expose_outputs",
    "extract_layer_model",
    "load_model",
    "make_cpu_session",
    "run_samples",
]

logger = logging.getLogger(__name__)


def load_model(model):
    """Return a ModelProto for a path or a ModelProto (external data is loaded too).

    Raises:
        InvalidModelError: the file is missing or not a readable ONNX model.
    """
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    path = os.fspath(model)
    if not os.path.isfile(path):
        raise InvalidModelError(f"model file {path!r} does not exist")
    try:
        return onnx.load(path)
    except Exception as e:  # protobuf raises its own DecodeError, not a ValueError
        raise InvalidModelError(f"cannot read ONNX model {path!r}: {e}") from e


def _subgraphs(graph) -> Iterator:
    import onnx

    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield attr.g
                yield from _subgraphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield g
                    yield from _subgraphs(g)


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
    nested = set().union(*(_produced_in(g) for g in _subgraphs(graph)))
    infos = None
    exposed, notes = [], []
    for name in dict.fromkeys(names):
        if name in present:
            exposed.append(name)
            continue
        if name not in main:
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


# protobuf cannot serialize a message of 2 GiB or more; such models go through a file.
_PROTO_LIMIT = 2**31 - 1


def _session_from_file(model, options):
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="dehm_verify_") as folder:
        path = os.path.join(folder, "model.onnx")
        # onnx.save moves tensors to external references in place; keep the caller's model intact.
        onnx.save(copy.deepcopy(model), path, save_as_external_data=True, location="model.onnx.data")
        try:
            return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise InvalidModelError(f"onnxruntime cannot load the model: {str(e).splitlines()[0]}") from e


def _read_external_data_in_place(model, options) -> None:
    """Let onnxruntime read a model's external tensors from their files, memory-mapped.

    A model loaded with its weights left in external files (``optimize_file``) is handed to
    onnxruntime as bytes with the folder its locations are relative to (the enclosing
    ``graph.external.weights_from`` block). Pre-packing is turned off for such models:
    onnxruntime then computes on the mapped pages and holds no second, packed copy of each
    weight (measured: peak RSS 1.08x the weights instead of 1.2x).

    Raises:
        InvalidModelError: the model has external tensors and no folder is known.
    """
    from ..graph import external

    if not external.external_tensors(model):
        return
    folder = external.current_folder()
    if folder is None:
        raise InvalidModelError("the model keeps tensors in external data, but its folder is unknown; load it from its path")
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    options.add_session_config_entry("session.disable_prepacking", "1")


def _uses_custom_domain(model) -> bool:
    from ..ops.hmatmul import DOMAIN

    return any(o.domain == DOMAIN for o in model.opset_import)


def make_cpu_session(model, quiet: bool = False):
    """An onnxruntime CPU InferenceSession for a ModelProto.

    A model with ``HMatMul`` nodes that stock onnxruntime cannot run (emitted without a
    function fallback) gets the compiled HMatMul library registered (built on first use).
    ``quiet`` silences onnxruntime's own error log (for runs that are allowed to fail).

    Raises:
        InvalidModelError: onnxruntime refuses the model.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4 if quiet else 3
    _read_external_data_in_place(model, options)
    if model.ByteSize() >= _PROTO_LIMIT:
        return _session_from_file(model, options)
    data = model.SerializeToString()
    try:
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        first = str(e).splitlines()[0]
        if not (_uses_custom_domain(model) and "not a registered function/op" in first):
            raise InvalidModelError(f"onnxruntime cannot load the model: {first}") from e
    from ..ops.library import custom_op_library

    options.register_custom_ops_library(str(custom_op_library()))
    try:
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise InvalidModelError(f"onnxruntime cannot load the model: {str(e).splitlines()[0]}") from e


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
