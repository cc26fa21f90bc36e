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
    "KERNEL_POLICIES",
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


# protobuf cannot serialize a message of 2 GiB or more; such models go through a file.
_PROTO_LIMIT = 2**31 - 1
# How a session gets the HMatMul library (``make_session``'s ``kernel``).
KERNEL_POLICIES = ("always", "if_needed", "prefer")


def make_session(model, providers=None, threads: int | None = None, config: dict | None = None, *,
                 kernel: str = "always", quiet: bool = False, data_folder: str | os.PathLike | None = None, **kw):
    """An ``onnxruntime.InferenceSession`` for ``model``: the one place the tool makes sessions.

    Raises ``CustomOpBuildError`` (or its ``CustomOpRuntimeError``, onnxruntime too old)
    when the library is needed and not available; a model written with ``--emit function``
    then still runs in a plain ``onnxruntime.InferenceSession``.

    Args:
        model: a path, serialized bytes or an ``onnx.ModelProto`` (one of 2 GiB or more is
            written to a temporary folder with external data first).
        providers: execution providers (default: CPU only).
        threads: ``intra_op_num_threads`` (default: onnxruntime's choice).
        config: session config entries, e.g. ``{"session.intra_op.allow_spinning": "0"}``.
        kernel: ``"always"`` registers the library; ``"if_needed"`` tries stock onnxruntime
            first and registers the library only for ``HMatMul`` nodes it cannot run (emit
            ``custom``: what verification measures); ``"prefer"`` registers it for models
            with ``HMatMul`` nodes and falls back to stock onnxruntime, with a warning, when
            it cannot be built (what ``compare`` times).
        quiet: silence onnxruntime's own error log (for loads that are allowed to fail).
        data_folder: the folder the external tensors of ``model`` (a ModelProto or bytes) are
            relative to. onnxruntime then maps them from their files, with pre-packing off,
            so that it computes on the mapped pages and holds no second, packed copy of each
            weight (measured on the big-model benchmark: peak RSS 1.08x the weights instead
            of 1.2x).
        **kw: passed to ``InferenceSession`` (``sess_options`` is used and gets the library).

    Raises:
        InvalidModelError: onnxruntime refuses the model.
    """
    import onnxruntime as ort

    if kernel not in KERNEL_POLICIES:
        raise ValueError(f"kernel must be one of {KERNEL_POLICIES}, got {kernel!r}")
    base = kw.pop("sess_options", None)
    entries = dict(config or {})
    if data_folder is not None:
        entries["session.model_external_initializers_file_folder_path"] = os.fspath(data_folder)
        entries["session.disable_prepacking"] = "1"

    def options(with_library: bool):
        opts = base or ort.SessionOptions()
        if base is None:
            opts.log_severity_level = 4 if quiet else 3
        if with_library:
            opts.register_custom_ops_library(str(custom_op_library()))
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
        for key, value in entries.items():
            opts.add_session_config_entry(key, str(value))
        return opts

    with _loadable(model) as source:
        if kernel == "always":
            return _session(ort, source, options(True), providers, kw)
        if kernel == "prefer" and _uses_hmatmul(model):
            try:
                return _session(ort, source, options(True), providers, kw)
            except CustomOpBuildError as e:
                import logging

                logging.getLogger(__name__).warning("running without the HMatMul kernel: %s", e)
        try:
            return _session(ort, source, options(False), providers, kw)
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            if kernel != "if_needed" or "not a registered function/op" not in first or not _uses_hmatmul(model):
                raise _refused(e) from e
        return _session(ort, source, options(True), providers, kw)


def _refused(error: Exception):
    from ..errors import InvalidModelError

    if isinstance(error, (InvalidModelError, CustomOpBuildError)):
        return error
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return InvalidModelError(f"onnxruntime cannot load the model: {first}")


def _session(ort, source, options, providers, kw):
    try:
        return ort.InferenceSession(source, options, providers=providers or ["CPUExecutionProvider"], **kw)
    except CustomOpBuildError:
        raise
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise _refused(e) from e


def _uses_hmatmul(model) -> bool:
    """Whether the model imports the ``ai.dehm`` domain (paths: read without their data)."""
    import onnx

    from .hmatmul import DOMAIN

    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(os.fspath(model), load_external_data=False)
    elif isinstance(model, bytes):
        model = onnx.load_from_string(model)
    return any(o.domain == DOMAIN for o in model.opset_import)


@contextlib.contextmanager
def _loadable(model):
    """What ``InferenceSession`` takes for ``model``: a path string or serialized bytes."""
    if isinstance(model, (str, os.PathLike)):
        yield os.fspath(model)
        return
    if isinstance(model, bytes):
        yield model
        return
    if model.ByteSize() < _PROTO_LIMIT:
        yield model.SerializeToString()
        return
    import copy
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory(prefix="dehm_session_") as folder:
        path = os.path.join(folder, "model.onnx")
        # onnx.save moves tensors to external references in place; keep the caller's model intact.
        onnx.save(copy.deepcopy(model), path, save_as_external_data=True, location="model.onnx.data")
        yield path
