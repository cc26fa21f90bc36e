"""Small external-data models for the big-model tests (kilobytes, not gigabytes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from tests.conftest import make_model, smooth_kernel


def kernel_weight(n: int, shift: float) -> np.ndarray:
    """An ``n x n`` smooth kernel (compresses) that differs per layer."""
    return (smooth_kernel(n, n).astype(np.float64) * (1.0 + shift)).astype(np.float32) / n


def mlp(layers: int = 3, n: int = 96) -> onnx.ModelProto:
    """``x -> MatMul(w0) -> ... -> MatMul(w{layers-1})``, every weight a compressible kernel."""
    nodes, inits = [], []
    current = "x"
    for i in range(layers):
        out = "y" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [out], name=f"fc{i}"))
        inits.append((f"w{i}", kernel_weight(n, 0.1 * i)))
        current = out
    return make_model(nodes, [("x", np.float32, ["B", n])], [("y", np.float32, ["B", n])], inits)


def save_external(model: onnx.ModelProto, folder: Path, name: str = "model.onnx", location: str | None = None) -> Path:
    """Save with every tensor in one data file ``<name>.data`` (or ``location``) beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save moves the tensors of the model it is given out of it
    onnx.save(
        copy,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location or f"{name}.data",
        size_threshold=0,
    )
    return path


def set_entry(path: Path, tensor_name: str, key: str, value: str) -> None:
    """Rewrite one external-data entry of a saved model (the data file is untouched)."""
    model = onnx.load(path, load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.name == tensor_name)
    for entry in tensor.external_data:
        if entry.key == key:
            entry.value = value
            break
    else:
        added = tensor.external_data.add()
        added.key, added.value = key, value
    onnx.save(model, path)


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
