"""Raise a model's default-domain opset with onnx's version converter, in place.

Integer factors in the form onnxruntime fuses (``DequantizeLinear`` with ``block_size``) and
int4 tensors need opset 21. ``upgrade_opset`` converts the model when onnx's version
converter does so cleanly: the converted model must pass the ONNX checker (with shape
inference) and keep its graph inputs and outputs; otherwise the model is left exactly as it
was and the reason is returned (the pass then writes integers in forms the old opset allows).
The outputs of the converted model are compared with the original's by the pass's
verification step (an end-to-end check on calibration data, on by default).

Large initializers do not go through the converter: as onnx-ir's shape inference does, they
are turned into graph inputs for the call (so external data is never read) and their tensors
are put back, by name, afterwards.
"""

from __future__ import annotations

import logging

import onnx
import onnx_ir as ir

__all__ = ["upgrade_opset", "INT_OPSET"]

logger = logging.getLogger(__name__)

# DequantizeLinear's block_size and the int4/uint4 types.
INT_OPSET = 21
_IR_FOR_OPSET_21 = 10
_SMALL_TENSOR = 1024  # bytes; initializers up to this size stay in the converted proto


def _stripped_proto(model: ir.Model) -> tuple[onnx.ModelProto, dict]:
    """The model as a proto whose large main-graph initializers are graph inputs instead."""
    graph = model.graph
    held = {}
    original_inputs = list(graph.inputs)
    for value in list(graph.initializers.values()):
        tensor = value.const_value
        if tensor is None or tensor.nbytes <= _SMALL_TENSOR:
            continue
        held[value.name] = (value, tensor)
        if value.shape is None:
            value.shape = tensor.shape
        if value.dtype is None:
            value.dtype = tensor.dtype
        if value not in graph.inputs:
            graph.inputs.append(value)
        graph.initializers.pop(value.name)
        value.const_value = None
    try:
        proto = ir.serde.serialize_model(model)
    finally:
        for value, tensor in held.values():
            value.const_value = tensor
            graph.register_initializer(value)
        graph.inputs.clear()
        graph.inputs.extend(original_inputs)
    return proto, {name: tensor for name, (_, tensor) in held.items()}


def upgrade_opset(model: ir.Model, target: int = INT_OPSET, keep=None) -> str | None:
    """Convert ``model`` to default-domain opset ``target`` in place; ``None`` on success,
    else the reason it was left unchanged (one sentence).

    ``keep(converted)``, when given, must accept the converted ``ir.Model`` (for instance:
    it still has the same layers) for ``model`` to be replaced by it.
    """
    current = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if current >= target:
        return None
    proto, held = _stripped_proto(model)
    inputs = [i.name for i in proto.graph.input if i.name not in held]
    outputs = [o.name for o in proto.graph.output]
    try:
        converted = onnx.version_converter.convert_version(proto, target)
        converted.ir_version = max(converted.ir_version, _IR_FOR_OPSET_21)
        onnx.checker.check_model(converted, full_check=True)
    except Exception as e:  # noqa: BLE001 - the converter and checker raise many types
        return f"onnx's version converter could not raise opset {current} to {target} ({type(e).__name__}: {_first_line(e)})"
    if [i.name for i in converted.graph.input if i.name not in held] != inputs or [o.name for o in converted.graph.output] != outputs:
        return f"onnx's version converter changed the graph inputs or outputs (opset {current} -> {target})"
    upgraded = ir.serde.deserialize_model(converted)
    graph = upgraded.graph
    for name, tensor in held.items():
        value = next((v for v in graph.inputs if v.name == name), None)
        if value is None:
            return f"onnx's version converter dropped the initializer {name!r} (opset {current} -> {target})"
        graph.inputs.remove(value)
        value.const_value = tensor
        graph.register_initializer(value)
    _restore_value_types(model, upgraded)
    if keep is not None and not keep(upgraded):
        return f"onnx's version converter changed the model's MatMul/Gemm layers (opset {current} -> {target})"
    _replace_contents(model, upgraded)
    logger.info("default-domain opset raised from %d to %d (onnx version converter)", current, target)
    return None


def _values(model: ir.Model):
    """Every named value of the model: graph inputs, outputs and initializers, node outputs,
    in subgraphs too."""
    graphs = [model.graph]
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                graphs.append(attr.value)
            elif attr.type == ir.AttributeType.GRAPHS:
                graphs.extend(attr.value)
    for graph in graphs:
        yield from graph.inputs
        yield from graph.outputs
        yield from graph.initializers.values()
        for node in graph:
            yield from node.outputs


def _restore_value_types(model: ir.Model, upgraded: ir.Model) -> None:
    """Give every value of ``upgraded`` the type and shape it had in ``model``: the converter
    runs shape inference, which would otherwise add shapes (to graph outputs too) that the
    model did not declare."""
    before = {v.name: (v.type, v.shape) for v in _values(model) if v.name}
    for value in _values(upgraded):
        if value.name in before:
            value.type, value.shape = before[value.name]
            if value.shape is not None:
                value.shape = ir.Shape(list(value.shape))


def _replace_contents(model: ir.Model, upgraded: ir.Model) -> None:
    """Make ``model`` (the object callers hold) the upgraded model (its opset imports are the
    graph's)."""
    model.graph = upgraded.graph
    model.ir_version = upgraded.ir_version
    model.functions.clear()
    model.functions.update(upgraded.functions)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else ""
