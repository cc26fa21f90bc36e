"""``python -m dehm_onnx optimize``: exit codes, one-line errors, atomic output."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper

from dehm_onnx import cli
from dehm_onnx.errors import BoundViolation
from tests.conftest import low_rank, make_model, output_bound, rel_fro, run_model


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dehm_onnx", *map(str, args)], capture_output=True, text=True, cwd=cwd)


@pytest.fixture
def model_path(tmp_path, rng):
    w = low_rank(rng, 128, 96)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
        [("x", np.float32, ["B", 128])],
        [("y", np.float32, ["B", 96])],
        [("w", w)],
    )
    path = tmp_path / "in.onnx"
    onnx.save(model, path)
    return path


def test_cli_optimize_writes_model_report_and_table(model_path, tmp_path, rng):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    before = model_path.read_bytes()
    # precision float: the exactly low-rank weight then compresses with rounding error only
    proc = _cli("optimize", model_path, out, "--tol", "0.01", "--precision", "float", "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert "fc" in proc.stdout and "compressed" in proc.stdout and "1 of 1 layers" in proc.stdout
    assert "file bytes" in proc.stdout and "lr float x1" in proc.stdout
    assert model_path.read_bytes() == before
    data = json.loads(report.read_text())
    assert data["totals"]["compressed"] == 1 and data["layers"][0]["tol"] == 0.01
    assert data["totals"]["bytes_after"] == out.stat().st_size
    x = rng.standard_normal((2, 128)).astype(np.float32)
    original = onnx.load(model_path)
    assert rel_fro(run_model(onnx.load(out), {"x": x})[0], run_model(original, {"x": x})[0]) < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "out.onnx", "report.json"]


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_text("hello, not a model"), "ONNX"),
        (lambda p: p.write_bytes(b""), "not an ONNX model"),
    ],
    ids=["missing", "text", "empty"],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, make_input, message):
    source = tmp_path / "in.onnx"
    make_input(source)
    proc = _cli("optimize", source, tmp_path / "out.onnx")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_cli_truncated_and_checker_failing_inputs_exit_2(model_path, tmp_path, capsys):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(model_path.read_bytes()[: model_path.stat().st_size // 2])
    broken = onnx.load(model_path)
    broken.graph.node[0].input[0] = "nowhere"  # an undefined input fails the checker
    bad = tmp_path / "bad.onnx"
    onnx.save(broken, bad)
    for source, message in ((truncated, "ONNX"), (bad, "checker")):
        assert cli.main(["optimize", str(source), str(tmp_path / "out.onnx")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "in.onnx", "truncated.onnx"]


def test_cli_refuses_output_equal_to_input(model_path, tmp_path, capsys):
    before = model_path.read_bytes()
    same = tmp_path / "." / "in.onnx"
    assert cli.main(["optimize", str(model_path), str(same)]) == 2
    assert "is the same file as IN" in capsys.readouterr().err
    assert model_path.read_bytes() == before


@pytest.mark.parametrize("tol", ["0", "1.5", "-1", "nan"])
def test_cli_tol_out_of_range_exits_2(model_path, tmp_path, capsys, tol):
    assert cli.main(["optimize", str(model_path), str(tmp_path / "o.onnx"), "--tol", tol]) == 2
    assert "tol must be in (0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


def test_cli_bad_arguments_exit_2_with_one_line(model_path, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["optimize", str(model_path), str(tmp_path / "o.onnx"), "--emit", "nonsense"])
    assert exc.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_cli_missing_output_folder_exits_2(model_path, tmp_path, capsys):
    assert cli.main(["optimize", str(model_path), str(tmp_path / "no" / "such" / "o.onnx")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_cli_bound_violation_exits_1(monkeypatch, model_path, tmp_path, capsys):
    def violate(args):
        raise BoundViolation("layer 'fc' (MatMul, 128x96): measured rel. error 3e-03 > tol_out 1e-03")

    monkeypatch.setattr("dehm_onnx.commands.optimize.run", violate)
    assert cli.main(["optimize", str(model_path), str(tmp_path / "o.onnx")]) == 1
    assert capsys.readouterr().err.startswith("error: BoundViolation: layer 'fc'")


def test_cli_verbose_shows_traceback(tmp_path, capsys):
    assert cli.main(["optimize", str(tmp_path / "missing.onnx"), str(tmp_path / "o.onnx"), "--verbose"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_cli_help_for_every_command():
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse keeps them here
    assert "optimize" in commands
    for name in commands:
        proc = _cli(name, "--help")
        assert proc.returncode == 0 and "usage:" in proc.stdout


def test_cli_flags_mirror_config_fields():
    import dataclasses

    from dehm_onnx.config import OptimizeConfig

    text = cli.build_parser()._subparsers._group_actions[0].choices["optimize"].format_help()  # noqa: SLF001
    for f in dataclasses.fields(OptimizeConfig):
        assert "--" + f.name.replace("_", "-") in text


def test_cli_keeps_external_data_layout(model_path, tmp_path, rng):
    source = tmp_path / "ext" / "in.onnx"
    source.parent.mkdir()
    onnx.save(onnx.load(model_path), source, save_as_external_data=True, location="in.onnx.data", size_threshold=0)
    out = tmp_path / "ext" / "out.onnx"
    assert cli.main(["optimize", str(source), str(out), "-q", "--precision", "float"]) == 0
    assert (tmp_path / "ext" / "out.onnx.data").is_file()
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in onnx.load(out, load_external_data=False).graph.initializer)
    x = rng.standard_normal((2, 128)).astype(np.float32)
    assert rel_fro(run_model(onnx.load(out), {"x": x})[0], run_model(onnx.load(source), {"x": x})[0]) < 1e-5


def test_save_model_leaves_nothing_behind_when_writing_fails(model_path, tmp_path, monkeypatch):
    from dehm_onnx.api import save_model

    import os

    real_fsync, calls = os.fsync, []

    def disk_full_at(n):
        def fsync(fd):
            calls.append(fd)
            if len(calls) == n:
                raise OSError(28, "No space left on device")
            return real_fsync(fd)

        return fsync

    # The 1st fsync fails (model alone, or OUT.data), then the 2nd (OUT after OUT.data).
    for external_data, n in ((False, 1), (True, 1), (True, 2)):
        calls.clear()
        monkeypatch.setattr("os.fsync", disk_full_at(n))
        with pytest.raises(OSError, match="cannot write .*out.onnx.*No space left"):
            save_model(onnx.load(model_path), tmp_path / "out.onnx", external_data=external_data)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_save_model_refuses_the_input_path(model_path):
    from dehm_onnx.api import save_model
    from dehm_onnx.errors import ConfigError

    before = model_path.read_bytes()
    with pytest.raises(ConfigError, match="is the input model"):
        save_model(onnx.load(model_path), model_path, refuse=model_path)
    assert model_path.read_bytes() == before


def test_cli_include_and_exclude_patterns_are_repeatable(model_path, tmp_path):
    report = tmp_path / "r.json"
    args = ["optimize", str(model_path), str(tmp_path / "o.onnx"), "-q", "--no-verify", "--report", str(report)]
    assert cli.main(args + ["--include", "nothing*", "--include", "f?"]) == 0
    assert json.loads(report.read_text())["layers"][0]["compressed"] is True
    assert cli.main(args + ["--exclude", "w", "--exclude", "other"]) == 0
    assert json.loads(report.read_text())["layers"][0]["skip_reason"] == "EXCLUDED"


def test_cli_name_not_valid_utf8_exits_2(model_path, tmp_path, capsys):
    data = model_path.read_bytes()
    position = data.index(b"fc")  # the node name
    bad = tmp_path / "bad_name.onnx"
    bad.write_bytes(data[:position] + b"f\xde" + data[position + 2 :])
    assert cli.main(["optimize", str(bad), str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not valid UTF-8" in err
    assert not (tmp_path / "o.onnx").exists()


def test_cli_report_in_missing_folder_fails_before_writing(model_path, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    assert cli.main(["optimize", str(model_path), str(out), "--report", str(tmp_path / "no" / "r.json")]) == 2
    assert "--report" in capsys.readouterr().err and not out.exists()


def test_cli_memory_error_anywhere_exits_2_with_one_line(monkeypatch, model_path, tmp_path, capsys):
    def out_of_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 4.00 TiB for an array with shape (4398046511104, 256)")

    monkeypatch.setattr("dehm_onnx.api.rewrite", out_of_memory)
    assert cli.main(["optimize", str(model_path), str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: MemoryError: ran out of memory (Unable to allocate 4.00 TiB")
    assert "Traceback" not in err and not (tmp_path / "o.onnx").exists()
    monkeypatch.setattr("dehm_onnx.api.rewrite", lambda *a, **k: (_ for _ in ()).throw(MemoryError()))
    assert cli.main(["optimize", str(model_path), str(tmp_path / "o.onnx")]) == 2
    assert capsys.readouterr().err.startswith("error: MemoryError: ran out of memory; ")


def _help(command: str) -> str:
    return cli.build_parser()._subparsers._group_actions[0].choices[command].format_help()  # noqa: SLF001


def _flag_helps(command: str) -> dict:
    parser = cli.build_parser()._subparsers._group_actions[0].choices[command]  # noqa: SLF001
    return {s: (a.help, a.metavar, a.choices) for a in parser._actions for s in a.option_strings}  # noqa: SLF001


def test_cli_help_texts_read_well():
    for command in ("optimize", "verify", "compare"):
        text = " ".join(_help(command).split())
        for bad in ("(default: None)", "(default: False)", "none = ", "(default: )", "value) (default"):
            assert bad not in text, (command, bad)
    text = " ".join(_help("optimize").split())
    assert "--tol-out T per-layer output bound" in text and "(default: the value of --tol)" in text
    assert "(default: off)" in text  # --max-model-error


def test_cli_shared_flags_come_from_one_definition_with_their_defaults():
    from dehm_onnx.config import OptimizeConfig

    optimize, verify, compare = (_flag_helps(c) for c in ("optimize", "verify", "compare"))
    shared = ["--calibration", "--input-shape", "--input-range", "--num-samples", "--seed"]
    for flag in shared:
        assert verify[flag] == optimize[flag] == compare[flag], flag
    assert compare["--min-size"] == optimize["--min-size"]
    # compare's --emit is repeatable (one set of dehm rows per mode) but offers optimize's modes
    assert compare["--emit"][2] == optimize["--emit"][2]
    text = " ".join(_help("verify").split())
    assert f"number of generated calibration samples (default: {OptimizeConfig().num_samples})" in text
    assert f"(default: {OptimizeConfig().seed})" in text


def test_cli_verify_num_samples_zero_is_refused(model_path, tmp_path, capsys):
    assert cli.main(["optimize", str(model_path), str(tmp_path / "o.onnx"), "-q", "--no-verify"]) == 0
    assert cli.main(["verify", str(model_path), str(tmp_path / "o.onnx"), "--num-samples", "0"]) == 2
    assert "num_samples must be an integer >= 1, got 0" in capsys.readouterr().err


def test_cli_rejects_an_unknown_precision(model_path, tmp_path):
    out = tmp_path / "out.onnx"
    proc = _cli("optimize", model_path, out, "--precision", "int3")
    assert proc.returncode == 2 and "int3" in proc.stderr and "int4" in proc.stderr
    assert not out.exists()


def test_cli_int4_on_a_float64_model_keeps_outputs_within_the_bound(tmp_path, rng):
    """DequantizeLinear has no float64 output: the integers are dequantized at load (exact),
    the table says which storages the layer uses, and a note says why nothing was fused."""
    w = rng.standard_normal((128, 96))
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
                       [("x", np.float64, ["B", 128])], [("y", np.float64, ["B", 96])], [("w", w)])
    source, out, report = tmp_path / "f64.onnx", tmp_path / "out.onnx", tmp_path / "report.json"
    onnx.save(model, source)
    proc = _cli("optimize", source, out, "--tol", "0.1", "--precision", "int4", "--min-size", "8", "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert "int4" in proc.stdout and "(float64): integer arrays dequantized" in proc.stdout
    x = rng.standard_normal((4, 128))
    y = run_model(onnx.load(out), {"x": x})[0]
    (layer,) = json.loads(report.read_text())["layers"]
    assert y.dtype == np.float64 and rel_fro(y, x @ w) <= output_bound(x, w, layer["rel_certified_error"], np.float64)
