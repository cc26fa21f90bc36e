"""Building and loading the HMatMul library: clear one-line errors when a tool is missing."""

from __future__ import annotations

import pytest

from dehm_onnx.errors import DehmError
from dehm_onnx.ops import library


def test_custom_op_library_returns_built_library():
    path = library.custom_op_library()
    assert path.is_file() and path.stat().st_size > 0
    assert library.custom_op_library() == path  # up to date: no rebuild


@pytest.mark.parametrize("missing,pattern", [("cmake", "no cmake found"), ("c++", "no C\\+\\+ compiler found")])
def test_custom_op_library_missing_tool_is_one_line_error(monkeypatch, tmp_path, missing, pattern):
    monkeypatch.setenv("DEHM_CACHE", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    real_which = library.shutil.which
    blocked = {"cmake"} if missing == "cmake" else {"c++", "g++", "clang++"}
    monkeypatch.setattr(library.shutil, "which", lambda name: None if name in blocked else real_which(name))
    with pytest.raises(DehmError, match=pattern) as info:
        library.custom_op_library()
    assert "\n" not in str(info.value)


def test_custom_op_library_missing_headers_is_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("DEHM_CACHE", str(tmp_path))
    monkeypatch.setenv("ORT_INCLUDE_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DehmError, match="onnxruntime_cxx_api.h") as info:
        library.custom_op_library()
    assert "\n" not in str(info.value)
