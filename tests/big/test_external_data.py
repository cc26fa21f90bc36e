"""External data: hostile locations and sizes are refused before any read; OUT.data beside OUT."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir
import pytest

import dehm_onnx
from dehm_onnx import model_io as external
from dehm_onnx.errors import ConfigError, InvalidModelError
from dehm_onnx.graph.sources import find_source

from ._models import mlp, save_external, set_entry, weights


@pytest.fixture
def saved(tmp_path):
    model = mlp(layers=2, n=32)
    return save_external(model, tmp_path / "in"), model


def _validate(path):
    model = onnx.load(path, load_external_data=False)
    return external.validate_external_data(model, path.parent)


def test_validate_accepts_a_well_formed_model_and_counts_its_bytes(saved):
    path, _ = saved
    assert _validate(path) == 2 * 32 * 32 * 4


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("location", "/etc/passwd", "absolute path"),
        ("location", "../secret.bin", r"leaves the model's folder \('..'\)"),
        ("location", "sub/../../secret.bin", r"'..'"),
        ("location", "..\\secret.bin", r"'..'"),
        ("location", "C:\\weights.bin", "absolute path"),
        ("location", "", "no location"),
        ("location", "missing.data", "cannot be opened"),
        ("offset", "-8", "offset must be >= 0"),
        ("offset", "12abc", "not an integer"),
        ("offset", "8000", "does not fit"),
        ("offset", "99999999", "beyond the end"),
        ("length", "99999999", "does not fit"),
        ("length", "12", "length 12 != 4096"),
    ],
)
def test_validate_refuses_hostile_locations_and_ranges(saved, key, value, message):
    path, _ = saved
    set_entry(path, "w1", key, value)
    with pytest.raises(InvalidModelError, match=message) as info:
        _validate(path)
    assert "'w1'" in str(info.value) and "\n" not in str(info.value)


def test_validate_refuses_a_symlink_pointing_out_of_the_folder(saved, tmp_path):
    path, _ = saved
    outside = tmp_path / "outside.bin"
    outside.write_bytes((path.parent / "model.onnx.data").read_bytes())
    (path.parent / "link.data").symlink_to(outside)
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "link.data"
    onnx.save(model, path)
    with pytest.raises(InvalidModelError, match="resolves outside the model's folder"):
        _validate(path)


def test_validate_accepts_a_symlink_inside_the_folder(saved):
    path, model = saved
    (path.parent / "alias.data").symlink_to(path.parent / "model.onnx.data")
    for name in ("w0", "w1"):
        set_entry(path, name, "location", "alias.data")
    assert _validate(path) == 2 * 32 * 32 * 4


def test_validate_refuses_a_fifo_without_opening_it(saved):
    path, _ = saved
    os.mkfifo(path.parent / "pipe.data")
    set_entry(path, "w0", "location", "pipe.data")
    with pytest.raises(InvalidModelError, match="not a regular file"):
        _validate(path)  # opening a FIFO for reading would block: the test would hang


def test_validate_refuses_a_directory(saved):
    path, _ = saved
    (path.parent / "dir.data").mkdir()
    set_entry(path, "w0", "location", "dir.data")
    with pytest.raises(InvalidModelError, match="not a regular file"):
        _validate(path)


def test_weights_are_memory_mapped_from_the_validated_slice(saved):
    path, model = saved
    lazy, _ = external.load_lazy(path)
    arrays = {name: find_source(value).array() for name, value in lazy.graph.initializers.items()}
    assert all(isinstance(a, np.memmap) for a in arrays.values())
    for name, expected in weights(model).items():
        np.testing.assert_array_equal(arrays[name], expected)


def test_external_tensors_without_a_folder_are_an_error_not_a_read_from_the_cwd(saved):
    path, _ = saved
    lazy = onnx.load(path, load_external_data=False)
    with pytest.raises(InvalidModelError, match="folder is unknown"):
        dehm_onnx.optimize(lazy, no_verify=True)


def test_save_model_puts_data_in_out_data_and_copies_lazily_loaded_tensors(saved, tmp_path):
    path, model = saved
    lazy, _ = external.load_lazy(path)
    out = tmp_path / "out" / "result.onnx"
    out.parent.mkdir()
    external.save_model(lazy, out, external=False)  # lazy tensors force external output
    assert sorted(p.name for p in out.parent.iterdir()) == ["result.onnx", "result.onnx.data"]
    written = onnx.load(out)
    for name, expected in weights(model).items():
        np.testing.assert_array_equal(weights(written)[name], expected)
    assert lazy.graph.initializers["w0"].const_value.location == "model.onnx.data"  # not modified


def test_save_model_refuses_to_overwrite_the_inputs_data_file(saved):
    path, _ = saved
    lazy, _ = external.load_lazy(path)
    before = (path.parent / "model.onnx.data").read_bytes()
    with pytest.raises(ConfigError, match="data file the input model uses"):
        external.save_model(lazy, path.parent / "model.onnx", external=True)
    assert (path.parent / "model.onnx.data").read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx.data"]


def test_save_model_in_memory_model_small_stays_one_file_unless_forced(tmp_path):
    model = mlp(layers=1, n=32)
    external.save_model(model, tmp_path / "a.onnx", external=False)
    external.save_model(model, tmp_path / "b.onnx", external=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx", "b.onnx.data"]
    np.testing.assert_array_equal(weights(onnx.load(tmp_path / "b.onnx"))["w0"], weights(model)["w0"])


def test_light_proto_passes_the_checker_without_reading_data(saved):
    path, _ = saved
    lazy, _ = external.load_lazy(path)
    onnx.checker.check_model(external.light_proto(lazy))
    assert all(isinstance(v.const_value, onnx_ir.ExternalTensor) for v in lazy.graph.initializers.values())


def test_validate_refuses_a_data_file_with_another_hard_link(saved, tmp_path):
    path, _ = saved
    os.link(path.parent / "model.onnx.data", tmp_path / "elsewhere.data")
    with pytest.raises(InvalidModelError, match="hard links"):
        _validate(path)
