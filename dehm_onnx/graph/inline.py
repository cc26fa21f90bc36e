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


# Functions calling functions are inlined one level per round (torch nests module functions).
MAX_ROUNDS = 8


def _operand_inputs(function: ir.Function, model: ir.Model, cache: dict) -> set[int]:
    """Indices of the function inputs that reach a MatMul/Gemm operand (A or B), also
    through the calls the body makes to other model-local functions."""
    key = function.identifier()
    if key in cache:
        return cache[key]
    cache[key] = set()  # a recursive call reaches nothing more
    reached = set()
    for index, value in enumerate(function.inputs):
        frontier, seen = [value], set()
        while frontier and index not in reached:
            current = frontier.pop()
            if id(current) in seen:
                continue
            seen.add(id(current))
            for use in current.uses():
                node = use.node
                callee = model.functions.get(node.op_identifier())
                if node.op_type in ("MatMul", "Gemm") and node.domain in ("", "ai.onnx") and use.idx < 2:
                    reached.add(index)
                elif node.op_type in _PASS_THROUGH and node.domain in ("", "ai.onnx") and use.idx == 0:
                    frontier.extend(node.outputs)
                elif callee is not None and use.idx in _operand_inputs(callee, model, cache):
                    reached.add(index)
    cache[key] = reached
    return reached


def _call_sites(model: ir.Model):
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        function = model.functions.get(node.op_identifier())
        if function is not None:
            yield node, function


def _name(function: ir.Function) -> str:
    overload = f":{function.overload}" if function.overload else ""
    return f"{function.domain}::{function.name}{overload}"


def _weight_functions(model: ir.Model) -> dict:
    """The functions some call site of the main graph passes a constant weight into."""
    cache: dict = {}
    chosen = {}
    for node, function in _call_sites(model):
        if function.domain == HMATMUL_DOMAIN:
            continue
        operands = _operand_inputs(function, model, cache)
        if any(i < len(node.inputs) and find_source(node.inputs[i]) is not None for i in operands):
            chosen[function.identifier()] = _name(function)
    return chosen


def inline_weight_functions(model: ir.Model) -> list[str]:
    """Inline the model-local functions that receive a constant weight; return their names.

    Names are ``domain::name`` (``:overload`` when there is one), outer functions first.
    """
    inlined: list[str] = []
    for _ in range(MAX_ROUNDS):
        chosen = _weight_functions(model)
        if not chosen:
            break
        ir.passes.common.InlinePass(criteria=lambda f, chosen=chosen: f.identifier() in chosen)(model)
        inlined += [name for name in chosen.values() if name not in inlined]
    return inlined
