"""The I/O layer keeps what the pass writes: node metadata and node/function overloads.

(onnx-graphsurgeon 0.6.1 drops both on a round trip, which is why the I/O layer is built
on onnx-ir: README, "Dependencies".)
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import dehm_onnx
from dehm_onnx import model_io
from tests.conftest import make_model, run_model, smooth_kernel


def _tagged_model() -> onnx.ModelProto:
    """Two HMatMul nodes (tagged, overloaded) with their overloaded model-local functions."""
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "w0"], ["h"], name="fc0"),
        onnx.helper.make_node("MatMul", ["h", "w1"], ["y"], name="fc1"),
    ]
    inits = [("w0", smooth_kernel(96, 96) / 96), ("w1", smooth_kernel(96, 64) / 96)]
    model = make_model(nodes, [("x", np.float32, ["B", 96])], [("y", np.float32, ["B", 64])], inits)
    model.metadata_props.add(key="author", value="test")
    optimized, report = dehm_onnx.optimize(model, emit="function", min_size=8, no_verify=True)
    assert len(report.compressed) == 2
    return optimized


def _identity(model: onnx.ModelProto):
    """What must survive: node names, overloads and metadata; functions with their overloads."""
    nodes = [(n.name, n.overload, [(p.key, p.value) for p in n.metadata_props]) for n in model.graph.node]
    functions = [(f.domain, f.name, f.overload, len(f.node)) for f in model.functions]
    return nodes, functions, [(p.key, p.value) for p in model.metadata_props]


@pytest.mark.parametrize("external", [False, True])
def test_round_trip_keeps_node_metadata_and_overloads(tmp_path, external):
    model = _tagged_model()
    nodes, functions, metadata = _identity(model)
    assert all(overload for _, overload, _ in nodes) and all(tags for _, _, tags in nodes)
    assert len({f[2] for f in functions if f[1] == "HMatMul"}) == 2  # two overloads of one function name
    path = tmp_path / "m.onnx"
    model_io.save_model(model, path, external=external)
    assert (tmp_path / "m.onnx.data").exists() == external
    loaded, _ = model_io.load_lazy(path)
    proto = model_io.to_proto(loaded)
    assert _identity(proto) == (nodes, functions, metadata)
    x = np.random.default_rng(0).standard_normal((2, 96)).astype(np.float32)
    np.testing.assert_array_equal(run_model(proto, {"x": x})[0], run_model(model, {"x": x})[0])


def test_saved_model_adds_no_value_info_for_initializers(tmp_path):
    model = _tagged_model()
    model_io.save_model(model_io.from_proto(model), tmp_path / "m.onnx", external=False)
    assert len(onnx.load(tmp_path / "m.onnx").graph.value_info) == len(model.graph.value_info)
