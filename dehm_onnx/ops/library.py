"""Locate, build and load the compiled ``HMatMul`` onnxruntime library (``custom_ops/``).

``custom_op_library()`` returns the library bundled in the installed package
(``dehm_onnx/_lib/``, present in the platform wheels) when there is one; in a checkout it
configures and builds the CMake project on first use (Release, Ninja when available) into a
cache folder, and later calls only check that the library is newer than its sources. Either
way it first checks that the installed onnxruntime provides the C API version the library
asks for. ``make_session()`` returns an ``onnxruntime.InferenceSession`` with the library
registered.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ..errors import DehmError

__all__ = [
    "CustomOpBuildError",
    "CustomOpRuntimeError",
    "custom_op_library",
    "make_session",
    "source_dir",
    "build_dir",
    "bundled_library",
    "required_ort_api",
    "check_runtime",
]

_LIB_NAMES = {"linux": "libdehm_custom_ops.so", "darwin": "libdehm_custom_ops.dylib", "win32": "dehm_custom_ops.dll"}
_SOURCE_SUFFIXES = {".cc", ".h", ".cu", ".cuh", ".txt", ".sh", ".cmake"}


class CustomOpBuildError(DehmError):
    """The HMatMul library cannot be built (no compiler, CMake or onnxruntime headers)."""


class CustomOpRuntimeError(CustomOpBuildError):
    """The installed onnxruntime is too old for the HMatMul library (models still run without it)."""


def bundled_library() -> Path:
    """Where a platform wheel puts the compiled library: ``dehm_onnx/_lib/`` in the package."""
    return Path(__file__).resolve().parents[1] / "_lib" / _LIB_NAMES.get(sys.platform, _LIB_NAMES["linux"])


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


def required_ort_api(lib: Path) -> int:
    """The onnxruntime C API version the library at ``lib`` asks for (read from the library)."""
    try:
        handle = ctypes.CDLL(str(lib))
        return int(handle.DehmRequiredOrtApiVersion())
    except (OSError, AttributeError) as e:
        raise CustomOpBuildError(f"cannot use the HMatMul library {lib}: {str(e).splitlines()[0]}") from e


def _ort_api_of(version: str) -> int | None:
    """The C API version of onnxruntime ``version`` ("1.20.1" -> 20); None if not of that form."""
    parts = version.split(".")
    if len(parts) < 2 or not parts[0].isdigit() or not parts[1].isdigit():
        return None
    major, minor = int(parts[0]), int(parts[1])
    return minor if major == 1 else (1 << 20 if major > 1 else None)


def check_runtime(required_api: int, ort_version: str | None = None) -> None:
    """Raise ``CustomOpRuntimeError`` when onnxruntime ``ort_version`` lacks C API ``required_api``.

    onnxruntime 1.x provides C API versions 1..x. ``ort_version`` defaults to the installed
    onnxruntime's; nothing is checked when onnxruntime is not installed or its version
    string is not of the form ``1.x``.
    """
    if ort_version is None:
        try:
            import onnxruntime
        except ImportError:
            return
        ort_version = onnxruntime.__version__
    have = _ort_api_of(ort_version)
    if have is not None and have < required_api:
        raise CustomOpRuntimeError(
            f"onnxruntime {ort_version} is too old for the HMatMul library: it provides C API version {have}, "
            f"the library needs {required_api} (onnxruntime >= 1.{required_api}); models written with "
            f"--emit function or subgraph still run without the library"
        )


def custom_op_library(rebuild: bool = False) -> Path:
    """Return the path of the compiled HMatMul library, building it first if needed.

    The library bundled in the installed package comes first; otherwise (a checkout) the
    library is built from ``custom_ops/``. Before returning, the installed onnxruntime is
    checked against the C API version the library asks for (registering the library in an
    older onnxruntime fails).

    Args:
        rebuild: build from the sources (configure from scratch) even if a bundled or an
            up-to-date built library exists.

    Raises:
        CustomOpBuildError: no bundled library and no sources, CMake, C++ compiler or
            onnxruntime headers.
        CustomOpRuntimeError: the installed onnxruntime is older than the library needs.
    """
    bundled = bundled_library()
    if not rebuild and bundled.is_file():
        check_runtime(required_ort_api(bundled))
        return bundled
    lib = _build_from_sources(rebuild)
    check_runtime(required_ort_api(lib))
    return lib


def _build_from_sources(rebuild: bool) -> Path:
    src = source_dir()
    if not (src / "CMakeLists.txt").is_file():
        raise CustomOpBuildError(
            f"cannot build the HMatMul library: sources not found at {src} and no library bundled at {bundled_library()} "
            f"(install a platform wheel of dehm_onnx, or work in a checkout)"
        )
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

    Raises ``CustomOpBuildError`` (or its ``CustomOpRuntimeError``, onnxruntime too old)
    when the library is not available; a model written with ``--emit function`` then still
    runs in a plain ``onnxruntime.InferenceSession``.

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
