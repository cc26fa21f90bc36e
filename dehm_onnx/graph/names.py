"""Short names for what a layer's emission adds to a model.

An emitter names every value ``<prefix>/<stem><n>`` so that its output is readable on its own
(``dehm_onnx.graph.emit``). In a model those names are pure overhead: each is written once
per node that reads or writes it, and on a small layer the names cost more bytes than the
weights (the 201 x 128 whisper filterbank's 59 nodes carried 7 KB of names against 12 KB
of weights). The pass renames them to ``<prefix>/<n in base 36>`` before splicing, with a
short ``prefix`` per layer; which layer a node belongs to is in its ``dehm.source_node``
metadata, and a layer's last node keeps the layer's original output name.
"""

from __future__ import annotations

import itertools

import onnx_ir as ir

__all__ = ["compact_names", "compact_function_names"]

_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def _base36(i: int) -> str:
    out = ""
    while True:
        i, r = divmod(i, 36)
        out = _DIGITS[r] + out
        if i == 0:
            return out


def compact_names(nodes, initializers, prefix: str) -> None:
    """Rename the initializers and node outputs whose names start with ``prefix`` to
    ``<prefix>/<n>``, in order, and drop the names of the nodes named so (a node's name is
    optional, and its output already names it); other names are left as they are."""
    counter = itertools.count()
    owned = prefix + "/", prefix + "."

    def rename(value: ir.Value) -> None:
        if value.name and value.name.startswith(owned):
            value.name = f"{prefix}/{_base36(next(counter))}"
            if value.const_value is not None:
                value.const_value.name = value.name

    for value in initializers:
        rename(value)
    for node in nodes:
        for value in node.outputs:
            rename(value)
        if node.name and node.name.startswith(owned):
            node.name = ""


def compact_function_names(function: ir.Function) -> None:
    """Rename the values a function body computes (its formal inputs and outputs keep their
    names, which are the op's) to base-36 numbers, and drop its node names."""
    formal = {v.name for v in (*function.inputs, *function.outputs)}
    counter = itertools.count()
    taken = set(formal)
    for node in function:
        node.name = ""
        if node.op_type == "Constant" and "value" in node.attributes:
            node.attributes["value"].value.name = None  # the output's name says it already
        for value in node.outputs:
            if value.name in formal or not value.name:
                continue
            name = _base36(next(counter))
            while name in taken:
                name = _base36(next(counter))
            value.name = name
