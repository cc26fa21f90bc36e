"""Input models are checked no more strictly than onnxruntime loads them (issue 11, item 12).

Each model here is refused by ``onnx.checker`` and loaded and run by onnxruntime; ``optimize``
accepts it, says what it tolerated, and writes an output with no defect the input did not have.
A model that onnxruntime cannot load is refused before any work, with a hint at --no-verify.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dehm_onnx import cli
from tests.conftest import rel_fro, run_model, smooth_kernel


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dehm_onnx", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def gp_regressor_like(n: int = 128) -> onnx.ModelProto:
    """The graph skl2onnx writes for ``GaussianProcessRegressor(return_std=True)``, by hand.

    An RBF kernel row ``k*(x)`` against n training points, the mean ``k* @ alpha`` and the std
    from ``k* @ K^-1`` (the n x n weight this tool is for). As skl2onnx does, the std output
    declares an element type and no shape. (``K^-1`` is a smooth kernel here, so that it
    compresses; the std is ``sqrt(1 + k* K^-1 k*^T)`` to keep it away from 0.)
    """
    arrays = {
        "Xtrain": np.linspace(0.0, 10.0, n)[None, :],
        "alpha": np.linspace(-1.0, 1.0, n)[:, None],
        "Kinv": smooth_kernel(n, n, np.float64) / n,
        "scale": np.array([-0.5]),
        "one": np.array([1.0]),
        "axes": np.array([1], np.int64),
    }
    nodes = [
        helper.make_node("Sub", ["X", "Xtrain"], ["D"]),
        helper.make_node("Mul", ["D", "D"], ["D2"]),
        helper.make_node("Mul", ["D2", "scale"], ["E"]),
        helper.make_node("Exp", ["E"], ["Ks"]),
        helper.make_node("MatMul", ["Ks", "alpha"], ["GPmean"], name="mean"),
        helper.make_node("MatMul", ["Ks", "Kinv"], ["T"], name="kinv"),
        helper.make_node("Mul", ["T", "Ks"], ["P"]),
        helper.make_node("ReduceSum", ["P", "axes"], ["S"], keepdims=0),
        helper.make_node("Add", ["S", "one"], ["V"]),
        helper.make_node("Sqrt", ["V"], ["GPcovstd"]),
    ]
    graph = helper.make_graph(
        nodes,
        "GPR",
        [helper.make_tensor_value_info("X", TensorProto.DOUBLE, [None, 1])],
        [
            helper.make_tensor_value_info("GPmean", TensorProto.DOUBLE, [None, 1]),
            helper.make_tensor_value_info("GPcovstd", TensorProto.DOUBLE, None),  # no shape
        ],
        [numpy_helper.from_array(a, name) for name, a in arrays.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _mlp() -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"), helper.make_node("Relu", ["h"], ["y"], name="act")]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 96])],
        [numpy_helper.from_array(smooth_kernel(128, 96), "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _input_without_shape(m):
    m.graph.input[0].type.tensor_type.ClearField("shape")


def _output_without_type(m):
    m.graph.output[0].ClearField("type")


def _no_graph_name(m):
    m.graph.name = ""


def _unsorted(m):
    nodes = list(m.graph.node)[::-1]
    del m.graph.node[:]
    m.graph.node.extend(nodes)


def _ir3(m):
    m.ir_version, m.opset_import[0].version = 3, 9


def _duplicate_metadata(m):
    m.metadata_props.add(key="k", value="1")
    m.metadata_props.add(key="k", value="2")


# Each: (how to damage the MLP, the defect found, what the note says).
DEFECTS = {
    "input_without_shape": (_input_without_shape, ("NO_SHAPE", "input 'x'"), "graph input 'x' declares no shape"),
    "output_without_type": (_output_without_type, ("NO_TYPE", "output 'y'"), "graph output 'y' declares no type"),
    "no_graph_name": (_no_graph_name, ("NO_GRAPH_NAME", ""), "the main graph has no name"),
    "unsorted": (_unsorted, ("UNSORTED", "the main graph"), "not in topological order"),
    "ir3": (_ir3, ("INITIALIZER_NOT_INPUT", ""), "initializers are not graph inputs"),
    "duplicate_metadata": (_duplicate_metadata, ("DUPLICATE_METADATA", "k"), "metadata key 'k'"),
}


def _damaged(name: str) -> onnx.ModelProto:
    model = _mlp()
    DEFECTS[name][0](model)
    return model


@pytest.mark.parametrize("name", sorted(DEFECTS))
def test_each_tolerated_defect_is_refused_by_the_checker_and_run_by_onnxruntime(name, rng):
    from dehm_onnx.model_check import Defect, check_model, find_defects

    model = _damaged(name)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    x = rng.standard_normal((2, 128)).astype(np.float32)
    assert run_model(model, {"x": x}, ["y"])[0].shape == (2, 96)
    assert find_defects(model) == [Defect(*DEFECTS[name][1])]
    assert check_model(model, "m") == [Defect(*DEFECTS[name][1])]


def test_gp_regressor_without_std_shape_is_accepted_and_said_so(tmp_path, rng):
    source, out, report = tmp_path / "gp.onnx", tmp_path / "gp.opt.onnx", tmp_path / "r.json"
    onnx.save(gp_regressor_like(), source)
    proc = _cli("optimize", source, out, "--report", report)  # verification on: onnxruntime loads it
    assert proc.returncode == 0, proc.stderr
    note = "tolerated: graph output 'GPcovstd' declares no shape"
    assert f"note: {note}" in proc.stdout
    assert note in proc.stderr and proc.stderr.count("\n") == 1  # one warning line
    assert any(note in n for n in json.loads(report.read_text())["notes"])
    optimized = onnx.load(out)
    assert not optimized.graph.output[1].type.tensor_type.HasField("shape")  # carried over
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(optimized)
    from dehm_onnx.model_check import Defect, find_defects

    assert find_defects(optimized) == [Defect("NO_SHAPE", "output 'GPcovstd'")]  # nothing new
    x = rng.uniform(0.0, 10.0, (5, 1))
    got, want = run_model(optimized, {"X": x}), run_model(onnx.load(source), {"X": x})
    assert all(rel_fro(g, w) < 1e-3 for g, w in zip(got, want))


@pytest.mark.parametrize("name", sorted(DEFECTS))
def test_cli_accepts_every_tolerated_defect_and_notes_it(name, tmp_path, rng):
    source, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(_damaged(name), source)
    # An input of unknown rank cannot get generated calibration data: verify without it.
    extra = ["--no-verify"] if name == "input_without_shape" else []
    proc = _cli("optimize", source, out, *extra)
    assert proc.returncode == 0, proc.stderr
    assert DEFECTS[name][2] in proc.stdout and "compressed" in proc.stdout
    optimized = onnx.load(out)
    from dehm_onnx.model_check import Defect, find_defects

    assert set(find_defects(optimized)) <= {Defect(*DEFECTS[name][1])}
    x = rng.standard_normal((2, 128)).astype(np.float32)
    assert rel_fro(run_model(optimized, {"x": x})[0], run_model(onnx.load(source), {"x": x})[0]) < 1e-2


def test_output_may_not_add_a_defect_the_input_did_not_have():
    from dehm_onnx.errors import InvalidModelError
    from dehm_onnx.model_check import Defect, check_model

    model = _damaged("output_without_type")
    with pytest.raises(InvalidModelError, match="fails the ONNX checker"):
        check_model(model, "the optimized model", carried=[])
    with pytest.raises(InvalidModelError, match="fails the ONNX checker"):
        check_model(model, "the optimized model", carried=[Defect("NO_TYPE", "output 'other'")])
    assert check_model(model, "the optimized model", carried=[Defect("NO_TYPE", "output 'y'")])


def test_a_real_checker_failure_beside_a_tolerated_one_is_still_refused(tmp_path, capsys):
    model = _damaged("no_graph_name")
    model.graph.node[0].input[0] = "nowhere"  # undefined input: onnxruntime refuses it too
    source = tmp_path / "in.onnx"
    onnx.save(model, source)
    assert cli.main(["optimize", str(source), str(tmp_path / "out.onnx")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "fails the ONNX checker" in err and "nowhere" in err
    assert not (tmp_path / "out.onnx").exists()


def _with_unknown_op(tmp_path):
    model = _mlp()
    model.graph.node[1].domain, model.graph.node[1].op_type = "com.example", "Swish"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    source = tmp_path / "custom.onnx"
    onnx.save(model, source)
    return source


def test_unknown_custom_op_is_refused_before_work_with_a_hint(tmp_path, capsys, monkeypatch):
    source = _with_unknown_op(tmp_path)

    def no_work(*args, **kwargs):
        raise AssertionError("the rewrite ran before the model was refused")

    monkeypatch.setattr("dehm_onnx.api.rewrite", no_work)
    assert cli.main(["optimize", str(source), str(tmp_path / "out.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "onnxruntime cannot load" in err and "Swish" in err and "--no-verify" in err
    assert not (tmp_path / "out.onnx").exists()


def test_unknown_custom_op_is_optimized_with_no_verify(tmp_path):
    source = _with_unknown_op(tmp_path)
    proc = _cli("optimize", source, tmp_path / "out.onnx", "--no-verify")
    assert proc.returncode == 0, proc.stderr
    assert "1 of 1 layers compressed" in proc.stdout


def test_a_model_onnxruntime_cannot_load_with_nothing_to_compress_is_not_refused(tmp_path):
    source = _with_unknown_op(tmp_path)
    proc = _cli("optimize", source, tmp_path / "out.onnx", "--exclude", "fc")  # verification has nothing to run
    assert proc.returncode == 0, proc.stderr
    assert "0 of 1 layers compressed" in proc.stdout
