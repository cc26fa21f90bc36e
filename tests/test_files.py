"""What the tool writes (issue 11, items 1, 2, 4): never over an input or another output,
checked before any work; one atomic writer; files get the umask's mode; nothing partial."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from dehm_onnx import cli
from dehm_onnx.errors import ConfigError
from tests.conftest import low_rank, make_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def model_path(tmp_path, rng):
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
        [("x", np.float32, ["B", 128])],
        [("y", np.float32, ["B", 96])],
        [("w", low_rank(rng, 128, 96))],
    )
    path = tmp_path / "in.onnx"
    onnx.save(model, path)
    return path


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command starts its work (compression, verification, comparison)."""

    def work(*args, **kwargs):
        raise AssertionError("work started before the paths were checked")

    # Imported first, so that no module binds the stand-ins below for good.
    import dehm_onnx.compare.measure  # noqa: F401
    import dehm_onnx.verify.tighten  # noqa: F401

    monkeypatch.setattr("dehm_onnx.api.rewrite", work)
    monkeypatch.setattr("dehm_onnx.api._load_lazy", work, raising=False)  # the graph is read after the check
    monkeypatch.setattr("dehm_onnx.verify.verify", work)
    monkeypatch.setattr("dehm_onnx.compare.compare", work)


@pytest.fixture
def umask():
    """Set the process umask for one test (the CLI runs in-process, so it applies)."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _refused(argv, capsys, *, words=()) -> str:
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    assert ".tmp" not in err
    return err


# --- item 1: an output never names an input or another output ---------------------------


def test_optimize_report_equal_to_input_is_refused_before_work(model_path, tmp_path, capsys, no_work):
    before = _snapshot(tmp_path)
    _refused(["optimize", model_path, tmp_path / "o.onnx", "--report", model_path], capsys, words=("--report", "IN"))
    assert _snapshot(tmp_path) == before


def test_optimize_report_equal_to_out_or_out_data_is_refused(model_path, tmp_path, capsys, no_work):
    before = _snapshot(tmp_path)
    out = tmp_path / "o.onnx"
    _refused(["optimize", model_path, out, "--report", out], capsys, words=("--report", "OUT"))
    _refused(["optimize", model_path, out, "--report", tmp_path / "o.onnx.data"], capsys, words=("OUT.data",))
    assert _snapshot(tmp_path) == before


def test_optimize_out_spelled_differently_symlinked_or_hard_linked_to_in_is_refused(model_path, tmp_path, capsys, no_work, monkeypatch):
    (tmp_path / "link.onnx").symlink_to(model_path)
    os.link(model_path, tmp_path / "hard.onnx")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    for out in ("./in.onnx", "sub/../in.onnx", "link.onnx", "hard.onnx", str(model_path)):
        _refused(["optimize", "in.onnx", out], capsys, words=("OUT", "IN", repr(out)))
    _refused(["optimize", "in.onnx", "o.onnx", "--report", "./link.onnx"], capsys, words=("--report",))
    assert _snapshot(tmp_path) == before


def test_optimize_out_equal_to_calibration_file_is_refused(model_path, tmp_path, capsys, no_work):
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.ones((2, 1, 128), np.float32))
    before = _snapshot(tmp_path)
    _refused(["optimize", model_path, calib, "--calibration", calib], capsys, words=("--calibration",))
    _refused(["optimize", model_path, tmp_path / "o.onnx", "--calibration", calib, "--report", calib], capsys)
    assert _snapshot(tmp_path) == before


def test_optimize_out_data_equal_to_an_input_data_file_is_refused(model_path, tmp_path, capsys, monkeypatch):
    source = tmp_path / "ext.onnx"
    onnx.save(onnx.load(model_path), source, save_as_external_data=True, location="o.onnx.data", size_threshold=0)
    monkeypatch.setattr("dehm_onnx.api.rewrite", lambda *a, **k: (_ for _ in ()).throw(AssertionError("work")))
    before = _snapshot(tmp_path)
    _refused(["optimize", source, tmp_path / "o.onnx"], capsys, words=("OUT.data", "a data file of IN"))
    _refused(["optimize", source, tmp_path / "p.onnx", "--report", tmp_path / "o.onnx.data"], capsys, words=("--report",))
    assert _snapshot(tmp_path) == before


@pytest.fixture
def optimized(model_path, tmp_path):
    out = tmp_path / "opt.onnx"
    assert cli.main(["optimize", str(model_path), str(out), "-q", "--tol", "0.01"]) == 0
    return out


def test_verify_report_equal_to_orig_or_opt_or_calibration_is_refused(model_path, optimized, tmp_path, capsys, no_work):
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.ones((2, 1, 128), np.float32))
    before = _snapshot(tmp_path)
    _refused(["verify", model_path, optimized, "--report", model_path], capsys, words=("--report", "ORIG"))
    _refused(["verify", model_path, optimized, "--report", optimized], capsys, words=("OPT",))
    _refused(["verify", model_path, optimized, "--calibration", calib, "--report", calib], capsys, words=("--calibration",))
    _refused(["verify", model_path, optimized, "--report", tmp_path / "missing" / "r.json"], capsys, words=("missing",))
    assert _snapshot(tmp_path) == before


def test_compare_outputs_may_not_clash_with_the_model_or_each_other(model_path, tmp_path, capsys, no_work):
    keep = tmp_path / "keep"
    keep.mkdir()
    kept_model = keep / "int8.onnx"
    kept_model.write_bytes(model_path.read_bytes())
    before = _snapshot(tmp_path)
    _refused(["compare", model_path, "--json", model_path], capsys, words=("--json", "MODEL"))
    _refused(["compare", model_path, "--json", tmp_path / "a", "--report", tmp_path / "a"], capsys, words=("--report", "--json"))
    _refused(["compare", model_path, "--plot", tmp_path / "./in.onnx"], capsys, words=("--plot",))
    _refused(["compare", kept_model, "--keep-models", keep], capsys, words=("--keep-models", "int8.onnx"))
    _refused(["compare", model_path, "--keep-models", model_path], capsys, words=("not a folder",))
    assert _snapshot(tmp_path) == before and _snapshot(keep) == {"int8.onnx": model_path.read_bytes()}


def test_check_paths_unit(tmp_path, monkeypatch):
    from dehm_onnx.files import PathRole, check_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "x").mkdir()
    with pytest.raises(ConfigError, match="OUT 'a' is the same file as IN 'a'"):
        check_paths([PathRole("IN", "a")], [PathRole("OUT", "a")])
    with pytest.raises(ConfigError, match="--report 'x/../b' is the same file as OUT 'b'"):
        check_paths([], [PathRole("OUT", "b"), PathRole("--report", "x/../b")])
    check_paths([PathRole("IN", "a")], [PathRole("OUT", "b"), PathRole("--report", "c")])


# --- item 4: missing folder, OUT a folder: before any work, naming the user's path ---------


def test_missing_output_folder_is_refused_before_work_naming_it(model_path, tmp_path, capsys, no_work):
    _refused(["optimize", model_path, tmp_path / "no" / "such" / "o.onnx"], capsys, words=("OUT", "no/such"))
    _refused(["optimize", model_path, tmp_path / "o.onnx", "--report", tmp_path / "nope" / "r.json"], capsys, words=("--report", "nope"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_out_or_out_data_a_folder_is_refused_before_work(model_path, tmp_path, capsys, no_work):
    (tmp_path / "dir.onnx").mkdir()
    (tmp_path / "o.onnx.data").mkdir()
    _refused(["optimize", model_path, tmp_path / "dir.onnx"], capsys, words=("OUT", "dir.onnx", "is a folder"))
    _refused(["optimize", model_path, tmp_path / "o.onnx"], capsys, words=("OUT.data", "is a folder"))
    _refused(["optimize", model_path, tmp_path / "p.onnx", "--report", tmp_path / "dir.onnx"], capsys, words=("--report",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.onnx", "in.onnx", "o.onnx.data"]


def test_writer_error_names_the_users_path_not_a_temporary_file(tmp_path):
    from dehm_onnx.api import save_model

    target = tmp_path / "gone" / "o.onnx"
    with pytest.raises(OSError) as error:
        save_model(make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", np.float32, [1])], [("y", np.float32, [1])]), target)
    assert str(target) in str(error.value) and ".tmp" not in str(error.value)


# --- item 2: one writer, the umask's mode, nothing partial ---------------------------------


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_every_optimize_output_gets_the_umask_mode(model_path, tmp_path, umask, mask, mode):
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    umask(mask)
    assert cli.main(["optimize", str(model_path), str(out), "-q", "--external-data", "--report", str(report)]) == 0
    for path in (out, tmp_path / "o.onnx.data", report):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


def test_a_replaced_output_gets_the_umask_mode_too(model_path, tmp_path, umask):
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    for path, old_mode in ((out, 0o600), (report, 0o755)):
        path.write_text("old")
        path.chmod(old_mode)
    umask(0o022)
    assert cli.main(["optimize", str(model_path), str(out), "-q", "--report", str(report)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o644 and stat.S_IMODE(report.stat().st_mode) == 0o644
    assert json.loads(report.read_text())["totals"]["compressed"] == 1


def test_verify_and_compare_outputs_get_the_umask_mode(model_path, optimized, tmp_path, umask):
    umask(0o027)
    report = tmp_path / "v.json"
    assert cli.main(["verify", str(model_path), str(optimized), "--report", str(report)]) == 0
    outputs = [tmp_path / "c.json", tmp_path / "c.md", tmp_path / "c.png"]
    argv = ["compare", str(model_path), "--method", "original", "--method", "dehm", "--tol", "0.01", "--rounds", "1"]
    argv += ["--json", str(outputs[0]), "--report", str(outputs[1]), "--plot", str(outputs[2]), "--keep-models", str(tmp_path / "k")]
    assert cli.main(argv) == 0
    for path in [report, *outputs, *(tmp_path / "k").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path


@pytest.mark.parametrize("failure", [OSError("disk full"), MemoryError(), KeyboardInterrupt()])
def test_atomic_output_leaves_nothing_and_keeps_the_old_file_on_failure(tmp_path, failure):
    from dehm_onnx.files import atomic_output, write_text

    target = tmp_path / "t.json"
    target.write_text("old")
    with pytest.raises(type(failure)):
        with atomic_output(target) as f:
            f.write(b"partial")
            raise failure
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["t.json"]
    write_text(target, "new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["t.json"]


def test_one_writer_for_everything_the_tool_writes():
    """Only dehm_onnx/files.py creates, replaces or saves files (ops/library.py's build lock aside)."""
    writes = re.compile(r"mkstemp|os\.replace|os\.rename|\.write_text\(|\.write_bytes\(|onnx\.save\(|np\.savez\([^f]|savefig\((?!f,)|open\([^)]*[\"'][wa]")
    found = []
    for path in sorted((ROOT / "dehm_onnx").rglob("*.py")):
        if path.name == "files.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if writes.search(line) and not line.lstrip().startswith("#"):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    allowed = {"dehm_onnx/ops/library.py", "dehm_onnx/verify/runner.py"}  # build lock; a session's scratch copy
    assert [f for f in found if f.split(":")[0] not in allowed] == []
