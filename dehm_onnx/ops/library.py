"""Build, locate and load the compiled ``HMatMul`` onnxruntime library (``custom_ops/``).

``custom_op_library()`` configures and builds the CMake project on first use (Release,
Ninja when available) into a cache folder and returns the shared library's path; later
calls only check that the library is newer than its sources. ``make_session()`` returns an
``onnxruntime.InferenceSession`` with the library registered.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ..errors import DehmError

__all__ = ["CustomOpBuildError", "custom_op_library", "make_session", "source_dir", "build_dir"]

_LIB_NAMES = {"linux": "libdehm_custom_ops.so", "darwin": "libdehm_custom_ops.dylib", "win32": "dehm_custom_ops.dll"}
_SOURCE_SUFFIXES = {".cc", ".h", ".cu", ".cuh", ".txt", ".sh", ".cmake"}


class CustomOpBuildError(DehmError):
    """The HMatMul library cannot be built (no compiler, CMake or onnxruntime headers)."""


def source_dir() -> Path:
    """The ``custom_ops/`` source folder of this checkout."""
    return Path(__file__).resolve().parents[2] / "custom_ops"


def build_dir() -> Path:
    """Where the library is built: ``$DEHM_CACHE/custom_ops-build-<hash of the source path>``.

    ``DEHM_CACHE`` defaults to ``~/.cache/dehm_onnx``; the hash keeps checkouts apart (a CMake
    build folder belongs to one source folder).
    """
    cache = Path(os.environ.get("DEHM_CACHE") or Path.home() / ".cache" / "dehm_onnx")
    tag = hashlib.sha1(str(source_dir()).encode()).hexdigest()[:10]
    return cache / f"custom_ops-build-{tag}"


def _library_path(build: Path) -> Path:
    return build / _LIB_NAMES.get(sys.platform, _LIB_NAMES["linux"])


def _newest_source_mtime(src: Path) -> float:
    mtimes = [p.stat().st_mtime for p in src.rglob("*") if p.suffix in _SOURCE_SUFFIXES and "build" not in p.parts]
    return max(mtimes, default=0.0)


def _find_tool(names, what: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise CustomOpBuildError(f"cannot build the HMatMul library: no {what} found (looked for {', '.join(names)})")


@contextlib.contextmanager
def _build_lock(build: Path):
    build.mkdir(parents=True, exist_ok=True)
    with open(build / ".lock", "w") as handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: builds are not serialised
            pass
        yield


def _run(cmd, what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CustomOpBuildError(f"cannot build the HMatMul library: {what} failed: {_first_error(proc)}")


def _first_error(proc) -> str:
    """The first error paragraph of a failed command, on one line."""
    lines = (proc.stderr + "\n" + proc.stdout).splitlines()
    at = next((i for i, ln in enumerate(lines) if "error" in ln.lower()), None)
    if at is None:
        return f"exit code {proc.returncode}"
    paragraph = []
    for ln in lines[at:]:
        if not ln.strip() and len(paragraph) > 1:
            break
        if ln.strip():
            paragraph.append(ln.strip())
    return " ".join(paragraph[:6])


def custom_op_library(rebuild: bool = False) -> Path:
    """Return the path of the compiled HMatMul library, building it first if needed.

    Args:
        rebuild: configure and build from scratch even if an up-to-date library exists.

    Raises:
        CustomOpBuildError: no sources, CMake, C++ compiler or onnxruntime headers.
    """
    src = source_dir()
    if not (src / "CMakeLists.txt").is_file():
        raise CustomOpBuildError(f"cannot build the HMatMul library: sources not found at {src}")
    build = build_dir()
    lib = _library_path(build)
    with _build_lock(build):
        if not rebuild and lib.is_file() and lib.stat().st_mtime >= _newest_source_mtime(src):
            return lib
        cmake = _find_tool(("cmake",), "cmake")
        if not os.environ.get("CXX"):
            _find_tool(("c++", "g++", "clang++"), "C++ compiler")
        if rebuild and (build / "CMakeCache.txt").exists():
            (build / "CMakeCache.txt").unlink()
        if not (build / "CMakeCache.txt").exists():
            cmd = [cmake, "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"]
            if shutil.which("ninja"):
                cmd += ["-G", "Ninja"]
            _run(cmd, "cmake configure")
        _run([cmake, "--build", str(build), "--parallel"], "cmake build")
        if not lib.is_file():
            raise CustomOpBuildError(f"cannot build the HMatMul library: the build did not produce {lib}")
        lib.touch()  # newer than every source even if ninja had nothing to do
    return lib


def make_session(model, providers=None, threads: int | None = None, config: dict | None = None, **kw):
    """An ``onnxruntime.InferenceSession`` for ``model`` with the HMatMul library registered.

    Args:
        model: a path, serialized bytes or an ``onnx.ModelProto``.
        providers: execution providers (default: CPU only).
        threads: ``intra_op_num_threads`` (default: onnxruntime's choice).
        config: session config entries, e.g. ``{"session.intra_op.allow_spinning": "0"}``.
        **kw: passed to ``InferenceSession`` (``sess_options`` is used and gets the library).
    """
    import onnxruntime as ort

    options = kw.pop("sess_options", None) or ort.SessionOptions()
    options.register_custom_ops_library(str(custom_op_library()))
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, str(value))
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    elif isinstance(model, Path):
        model = str(model)
    return ort.InferenceSession(model, options, providers=providers or ["CPUExecutionProvider"], **kw)
