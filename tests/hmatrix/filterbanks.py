"""The mel filterbanks of the onnx-asr 0.12.0 preprocessors (real banded weights).

``filterbank(name)`` fetches the preprocessor through ``models/fetch.py`` (cached in
``~/.cache/dehm_onnx``) and returns the constant 2-D right operand of its ``MatMul``, the
filterbank as the model uses it (frequency bins x mel bands, float32). Tests and benchmarks
only: the engine itself never reads ONNX.
"""

from __future__ import annotations

import numpy as np

from models.fetch import fetch_wheel_member

__all__ = ["FILTERBANKS", "filterbank"]

PACKAGE, VERSION = "onnx-asr", "0.12.0"
# Preprocessor name -> filterbank shape, smallest to largest.
FILTERBANKS = {
    "gigaam_v3": (161, 64),
    "gigaam_v2": (201, 64),
    "whisper80": (201, 80),
    "whisper128": (201, 128),
    "kaldi": (257, 80),
    "wespeaker": (257, 80),
    "nemo80": (257, 80),
    "nemo128": (257, 128),
}

_cache: dict[str, np.ndarray] = {}


def filterbank(name: str) -> np.ndarray:
    """The MatMul weight of preprocessor ``name`` (a key of ``FILTERBANKS``)."""
    if name not in _cache:
        import onnx
        from onnx import numpy_helper

        path = fetch_wheel_member(PACKAGE, VERSION, f"onnx_asr/preprocessors/data/{name}.onnx")
        graph = onnx.load(str(path)).graph
        constants = {init.name: init for init in graph.initializer}
        weights = [
            numpy_helper.to_array(constants[x])
            for node in graph.node
            if node.op_type == "MatMul"
            for x in node.input[1:]
            if x in constants and len(constants[x].dims) == 2
        ]
        if len(weights) != 1:
            raise ValueError(f"{name}: expected one constant 2-D MatMul weight, found {len(weights)}")
        _cache[name] = weights[0]
    return _cache[name]
