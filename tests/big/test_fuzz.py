"""Fuzz: mutated/truncated model files and mutated external data give a clean error or a result.

"Clean" means: the API raises a ``DehmError`` (the CLI exits 2 with one line on stderr) and
leaves no output file, or it succeeds and the output loads and passes the ONNX checker. Never
another exception, a hang (the CLI runs under a timeout) or a partial output. Bounded by
``max_examples``; seeded (``derandomize``) so CI runs the same cases every time.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dehm_onnx import api
from dehm_onnx.errors import DehmError

from ._models import mlp, save_external

N = 24
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


def _model_bytes() -> bytes:
    return mlp(layers=2, n=N).SerializeToString()


BASE = _model_bytes()

mutations = st.lists(
    st.tuples(st.integers(0, len(BASE) - 1), st.integers(0, 255)), min_size=1, max_size=8
)


def _mutate(data: bytes, changes) -> bytes:
    buf = bytearray(data)
    for position, value in changes:
        buf[position % len(buf)] = value
    return bytes(buf)


def _outputs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(("out", ".out")))


def _optimize_cleanly(path: Path, folder: Path) -> None:
    """Run the API; assert the outcome is a result or a DehmError with nothing left behind."""
    out = folder / "out.onnx"
    try:
        api.optimize_file(path, out, min_size=8, no_verify=True, jobs=1)
    except DehmError as e:
        assert "\n" not in str(e).strip()
        assert _outputs(folder) == []
        return
    onnx.checker.check_model(str(out))
    assert set(_outputs(folder)) <= {"out.onnx", "out.onnx.data"}


@FUZZ
@given(changes=mutations)
def test_mutated_model_bytes(changes):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = folder / "in.onnx"
        path.write_bytes(_mutate(BASE, changes))
        _optimize_cleanly(path, folder)


@FUZZ
@given(cut=st.integers(0, len(BASE) - 1))
def test_truncated_model_file(cut):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = folder / "in.onnx"
        path.write_bytes(BASE[:cut])
        _optimize_cleanly(path, folder)


_entry_values = st.one_of(
    st.sampled_from(["..", "../model.onnx.data", "/dev/zero", "/proc/self/mem", "model.onnx", ".", "", "a/../b"]),
    st.integers(-(2**63), 2**63).map(str),
    st.text(max_size=12),
)


@FUZZ
@given(
    key=st.sampled_from(["location", "offset", "length", "checksum", "basepath", "unknown"]),
    value=_entry_values,
    data_changes=st.lists(st.tuples(st.integers(0, 2 * N * N * 4 - 1), st.integers(0, 255)), max_size=16),
    truncate=st.one_of(st.none(), st.integers(0, 2 * N * N * 4 - 1)),
)
def test_mutated_external_data(key, value, data_changes, truncate):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = save_external(mlp(layers=2, n=N), folder)
        model = onnx.load(path, load_external_data=False)
        tensor = model.graph.initializer[1]
        entry = next((e for e in tensor.external_data if e.key == key), None) or tensor.external_data.add()
        entry.key, entry.value = key, value
        path.write_bytes(model.SerializeToString())
        data = folder / "model.onnx.data"
        data.write_bytes(_mutate(data.read_bytes(), data_changes)[:truncate] if data_changes else data.read_bytes()[:truncate])
        _optimize_cleanly(path, folder)


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(changes=mutations, cut=st.integers(1, len(BASE)))
def test_cli_on_mutated_models_exits_0_or_2(changes, cut):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = folder / "in.onnx"
        path.write_bytes(_mutate(BASE, changes)[:cut])
        proc = subprocess.run(
            [sys.executable, "-m", "dehm_onnx", "optimize", str(path), str(folder / "out.onnx"), "--min-size", "8", "-q"],
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode in (0, 2), proc.stderr
        if proc.returncode == 2:
            assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
            assert _outputs(folder) == []
        else:
            onnx.checker.check_model(str(folder / "out.onnx"))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
