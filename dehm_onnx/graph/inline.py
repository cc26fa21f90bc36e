"""Reach weights passed as arguments into model-local functions, by inlining those functions.

The legacy torch exporter with ``export_modules_as_functions=True`` writes each module as a
model-local function and passes the module's weight into it as an argument: inside the
body the weight is a function input, not a constant. A function is inlined (onnx-ir's
``InlinePass``, at every call site) when some call passes a constant (a ``WeightSource``)
into an input that one of the body's MatMul/Gemm nodes uses as an operand, possibly through
the body's own cast/reshape/transpose/identity steps. Other functions stay as they are, and
so do the ``ai.dehm`` functions the pass itself writes. The report lists what was inlined.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common

from ..ops.hmatmul import DOMAIN as HMATMUL_DOMAIN
from .sources import find_source

__all__ = ["inline_weight_functions"]

_PASS_THROUGH = {"Identity", "Cast", "Reshape", "Transpose", "DequantizeLinear", "Mul"}


def _operand_inputs(function: ir.Function) -> set[int]:
    """Indices of the function inputs that reach a MatMul/Gemm operand (A or B)."""
    reached = set()
    for index, value in enumerate(function.inputs):
        frontier, seen = [value], set()
        while frontier:
            current = frontier.pop()
            if id(current) in seen:
                continue
            seen.add(id(current))
            for use in current.uses():
                node = use.node
                if node.op_type in ("MatMul", "Gemm") and node.domain in ("", "ai.onnx") and use.idx < 2:
                    reached.add(index)
                elif node.op_type in _PASS_THROUGH and node.domain in ("", "ai.onnx") and use.idx == 0:
                    frontier.extend(node.outputs)
    return reached


def _call_sites(model: ir.Model):
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        function = model.functions.get(node.op_identifier())
        if function is not None:
            yield node, function


def inline_weight_functions(model: ir.Model) -> list[str]:
    """Inline the model-local functions that receive a constant weight; return their names.

    Names are ``domain::name`` (``:overload`` when there is one), in model order.
    """
    operands = {}
    chosen: dict[ir.OperatorIdentifier, str] = {}
    for node, function in _call_sites(model):
        key = function.identifier()
        if function.domain == HMATMUL_DOMAIN:
            continue
        if key not in operands:
            operands[key] = _operand_inputs(function)
        if any(i < len(node.inputs) and find_source(node.inputs[i]) is not None for i in operands[key]):
            overload = f":{function.overload}" if function.overload else ""
            chosen[key] = f"{function.domain}::{function.name}{overload}"
    if not chosen:
        return []
    ir.passes.common.InlinePass(criteria=lambda f: f.identifier() in chosen)(model)
    return list(chosen.values())
