"""External data: validate it before reading, read weights lazily, write it beside OUT.

ONNX keeps tensors outside the ``.onnx`` file when ``data_location == EXTERNAL``; the tensor's
``external_data`` entries give ``location`` (a path relative to the model's folder),
``offset`` and ``length`` in bytes (see https://onnx.ai/onnx/repo-docs/ExternalData.html).
A hostile model can point those anywhere, so before any byte is read ``validate_external_data``
requires, for every external tensor of every graph:

- ``location`` is relative, has no ``..`` component, and resolves (symlinks followed) to a
  regular file inside the model's folder;
- ``offset`` and ``length`` are non-negative integers with ``offset + length <= file size``,
  and ``length`` equals the size implied by the tensor's dims and type.

Failures raise ``InvalidModelError`` naming the tensor. After validation, weights are read
by memory-mapping (``tensor_array`` / ``weight_slice``), one weight at a time, so a model
larger than memory can be optimized. ``write_model`` writes ``OUT`` and, when asked or when
needed, one data file ``OUT.data`` beside it, copying the input's external tensors in chunks;
it writes nothing outside OUT's folder and refuses to overwrite any file the model reads from.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import ConfigError, InvalidModelError
from ..files import StagedFile, atomic_output
from ..weights import WeightSlice

__all__ = [
    "PROTO_LIMIT",
    "uses_external_data",
    "iter_tensors",
    "external_tensors",
    "validate_external_data",
    "weights_from",
    "current_folder",
    "tensor_array",
    "weight_slice",
    "external_bytes",
    "materialize",
    "checkable_copy",
    "data_file_name",
    "data_files",
    "refuse_overwrite",
    "write_model",
]

# A serialized protobuf message cannot exceed 2 GB.
PROTO_LIMIT = 2**31 - 1
# Tensors at least this large go to the data file; smaller ones stay in the .onnx file.
_SIZE_THRESHOLD = 1024
# Large tensors start on a page boundary so that runtimes can memory-map them.
_ALIGN, _ALIGN_THRESHOLD = 4096, 1 << 20
_COPY_CHUNK = 16 << 20

_EXTERNAL = onnx.TensorProto.EXTERNAL
# Element types stored two per byte.
_PACKED_4BIT = {
    getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)
}

# Folder that external-data locations are relative to, while a pass reads the weights.
_FOLDER: contextvars.ContextVar[Path | None] = contextvars.ContextVar("dehm_external_folder", default=None)


def uses_external_data(tensor: onnx.TensorProto) -> bool:
    """True when the tensor's values live in an external file."""
    return tensor.HasField("data_location") and tensor.data_location == _EXTERNAL


def iter_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of the model: initializers and tensor attributes, subgraphs and functions."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield attr.sparse_tensor.values
            yield attr.sparse_tensor.indices
        for sparse in attr.sparse_tensors:
            yield sparse.values
            yield sparse.indices
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for sub in attr.graphs:
            yield from _graph_tensors(sub)


def external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The tensors whose data is external, in model order."""
    return [t for t in iter_tensors(model) if uses_external_data(t)]


def _entries(tensor: onnx.TensorProto) -> dict[str, str]:
    entries: dict[str, str] = {}
    for entry in tensor.external_data:
        if entry.key in entries:
            raise InvalidModelError(f"tensor {tensor.name!r}: external data key {entry.key!r} is given twice")
        entries[entry.key] = entry.value
    return entries


def _check_location(name: str, location: str) -> None:
    """Refuse locations that could name a file outside the model's folder (before any I/O)."""
    if not location:
        raise InvalidModelError(f"tensor {name!r}: external data has no location")
    if "\x00" in location:
        raise InvalidModelError(f"tensor {name!r}: external data location contains a NUL byte")
    windows = PureWindowsPath(location)
    if os.path.isabs(location) or PurePosixPath(location).is_absolute() or windows.drive or windows.root:
        raise InvalidModelError(f"tensor {name!r}: external data location {location!r} is an absolute path")
    if ".." in windows.parts or ".." in PurePosixPath(location).parts:
        raise InvalidModelError(f"tensor {name!r}: external data location {location!r} leaves the model's folder ('..')")


def _integer(name: str, key: str, text: str | None, default: int | None) -> int | None:
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise InvalidModelError(f"tensor {name!r}: external data {key} {text!r} is not an integer") from None
    if value < 0:
        raise InvalidModelError(f"tensor {name!r}: external data {key} must be >= 0, got {value}")
    return value


def _expected_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes implied by dims and type; ``None`` for types without a fixed size (strings)."""
    if any(d < 0 for d in tensor.dims):
        raise InvalidModelError(f"tensor {tensor.name!r} has negative dims {list(tensor.dims)}")
    count = int(np.prod([int(d) for d in tensor.dims], dtype=object)) if tensor.dims else 1
    if tensor.data_type in _PACKED_4BIT:
        return (count + 1) // 2
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except Exception:  # noqa: BLE001 - unknown or undefined data_type
        raise InvalidModelError(f"tensor {tensor.name!r} has an unknown data type {tensor.data_type}") from None
    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    return count * itemsize


def _resolve(tensor: onnx.TensorProto, folder: Path) -> tuple[Path, int, int]:
    """``(file, offset, length)`` of a validated external tensor."""
    name = tensor.name
    entries = _entries(tensor)
    location = entries.get("location", "")
    _check_location(name, location)
    offset = _integer(name, "offset", entries.get("offset"), 0)
    length = _integer(name, "length", entries.get("length"), None)
    root = folder.resolve()
    try:
        target = (root / location).resolve(strict=True)
    except (OSError, RuntimeError) as e:  # missing file, symlink loop
        raise InvalidModelError(f"tensor {name!r}: external data file {location!r} cannot be opened ({type(e).__name__})") from None
    if not target.is_relative_to(root):
        raise InvalidModelError(f"tensor {name!r}: external data location {location!r} resolves outside the model's folder")
    info = target.stat()
    if not stat.S_ISREG(info.st_mode):
        raise InvalidModelError(f"tensor {name!r}: external data location {location!r} is not a regular file")
    size = info.st_size
    if offset > size:
        raise InvalidModelError(f"tensor {name!r}: external data offset {offset} is beyond the end of {location!r} ({size} bytes)")
    if length is None:
        length = size - offset
    if offset + length > size:
        raise InvalidModelError(
            f"tensor {name!r}: external data [{offset}, {offset + length}) does not fit {location!r} ({size} bytes)"
        )
    expected = _expected_nbytes(tensor)
    if expected is not None and length != expected:
        raise InvalidModelError(
            f"tensor {name!r}: external data length {length} != {expected} bytes for dims {list(tensor.dims)}"
        )
    if tensor.HasField("raw_data") and len(tensor.raw_data):
        raise InvalidModelError(f"tensor {name!r} has both external data and raw_data")
    return target, offset, length


def validate_external_data(model: onnx.ModelProto, folder: str | os.PathLike) -> int:
    """Check every external tensor's location, offset and length; return their total bytes.

    Nothing is read from the data files: only their paths and sizes are examined.

    Raises:
        InvalidModelError: a location escapes ``folder`` (absolute, ``..``, symlink out), is
            not a regular file, or an offset/length does not fit the file or the tensor.
    """
    folder = Path(folder)
    return sum(_resolve(t, folder)[2] for t in external_tensors(model))


def external_bytes(model: onnx.ModelProto) -> int:
    """Total bytes the model's external tensors declare (no file access)."""
    total = 0
    for tensor in external_tensors(model):
        length = _entries(tensor).get("length")
        total += int(length) if length and length.isdigit() else (_expected_nbytes(tensor) or 0)
    return total


@contextlib.contextmanager
def weights_from(folder: str | os.PathLike | None):
    """Within the block, external tensors are read relative to ``folder``."""
    token = _FOLDER.set(Path(folder) if folder is not None else None)
    try:
        yield
    finally:
        _FOLDER.reset(token)


def current_folder() -> Path | None:
    """The folder set by the innermost ``weights_from`` block (None outside any)."""
    return _FOLDER.get()


def _folder_for(tensor: onnx.TensorProto) -> Path:
    folder = _FOLDER.get()
    if folder is None:
        raise InvalidModelError(
            f"tensor {tensor.name!r} is stored in external data, but the model's folder is unknown "
            "(load the model from its path)"
        )
    return folder


def weight_slice(tensor: onnx.TensorProto) -> WeightSlice | None:
    """Where an external tensor lives (validated), or ``None`` for an in-memory tensor."""
    if not uses_external_data(tensor):
        return None
    path, offset, _ = _resolve(tensor, _folder_for(tensor))  # also rejects unknown data types
    if tensor.data_type in _PACKED_4BIT or tensor.data_type == onnx.TensorProto.STRING:
        raise InvalidModelError(f"tensor {tensor.name!r}: external data of this type cannot be memory-mapped")
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    return WeightSlice(str(path), offset, dtype.str, tuple(int(d) for d in tensor.dims))


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The tensor's values: memory-mapped when external, else decoded from the proto."""
    where = weight_slice(tensor)
    if where is not None:
        return where.open()
    try:
        return numpy_helper.to_array(tensor)
    except Exception as e:  # noqa: BLE001 - the checker lets some inconsistent tensors through
        raise InvalidModelError(f"tensor {tensor.name!r} cannot be decoded ({type(e).__name__}: {e})") from e


def _read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise InvalidModelError(f"external data file {path.name!r} shrank while being read")
    return data


def materialize(model: onnx.ModelProto, folder: str | os.PathLike) -> None:
    """Move every external tensor's bytes into the proto (``raw_data``), in place."""
    folder = Path(folder)
    for tensor in external_tensors(model):
        path, offset, length = _resolve(tensor, folder)
        data = _read(path, offset, length)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
        tensor.raw_data = data


def checkable_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy that ``onnx.checker`` can check in memory: external tensors become empty stubs.

    The checker resolves external locations against the current directory when given a
    proto; the locations were validated separately, so the stubs keep name and type only.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in external_tensors(copy):
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
        tensor.dims[:] = [0] * len(tensor.dims)
    return copy


def data_file_name(output: str | os.PathLike) -> str:
    """Name of OUT's external data file (beside OUT)."""
    return f"{Path(output).name}.data"


def data_files(model: onnx.ModelProto, folder: str | os.PathLike) -> set[Path]:
    """The resolved paths of the files the model's external tensors live in."""
    return {_resolve(t, Path(folder))[0] for t in external_tensors(model)}


def refuse_overwrite(model: onnx.ModelProto, folder: str | os.PathLike, output: str | os.PathLike) -> None:
    """Raise ``ConfigError`` when OUT or OUT.data is one of the model's data files."""
    output = Path(output)
    sources = data_files(model, folder)
    for target in (output, output.with_name(data_file_name(output))):
        if target.resolve() in sources or any(_same(target, s) for s in sources):
            raise ConfigError(
                f"output file {str(target)!r} is a data file the input model uses; choose another output name"
            )


def _source_files(model: onnx.ModelProto) -> set[Path]:
    folder = _FOLDER.get()
    if folder is None:
        return set()
    return {_resolve(t, folder)[0] for t in external_tensors(model)}


def write_model(model: onnx.ModelProto, path: str | os.PathLike, *, external: bool, refuse=()) -> int:
    """Write ``model`` to ``path``, with its large tensors in ``path.data`` when ``external``.

    External tensors of ``model`` (lazily loaded) are copied in chunks from their validated
    files (relative to the folder given by ``weights_from``); the model is not modified.
    Both files are written by ``dehm_onnx.files.StagedFile`` (a temporary name in OUT's
    folder, ``fsync``, rename; mode ``0o666`` less the umask), the data file renamed into
    place first. A model with external tensors is always written with external data.

    Returns:
        Bytes written (OUT plus OUT.data).

    Raises:
        ConfigError: ``path.data`` is a file the model reads from, or one of ``refuse``.
        OSError: the folder is missing or not writable (nothing is left behind).
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    lazy = bool(external_tensors(model))
    if not (external or lazy):
        with atomic_output(path) as out:
            out.write(model.SerializeToString())
        return path.stat().st_size
    data_path = folder / data_file_name(path)
    sources = _source_files(model) | {Path(r).resolve() for r in refuse}
    if data_path.resolve() in sources or any(_same(data_path, s) for s in sources):
        raise ConfigError(
            f"output file {str(data_path)!r} is a data file the input model uses; choose another output name"
        )
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    data = StagedFile(data_path)
    try:
        staged = StagedFile(path)
        try:
            _write_tensors(copy, data.file, data_path.name)
            staged.file.write(copy.SerializeToString())
            data.finish()
            staged.finish()  # both on disk before either is renamed into place
            data.commit()
            staged.commit()
        finally:
            staged.discard()
    finally:
        data.discard()
    return path.stat().st_size + data_path.stat().st_size


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _write_tensors(model: onnx.ModelProto, out, location: str) -> None:
    """Append every large tensor of ``model`` to ``out`` and point the tensor at it."""
    folder = _FOLDER.get()
    offset = 0
    for tensor in iter_tensors(model):
        if uses_external_data(tensor):
            source, start, length = _resolve(tensor, _folder_for(tensor) if folder is None else folder)
            chunks = _file_chunks(source, start, length)
        elif tensor.data_type != onnx.TensorProto.STRING and _tensor_nbytes(tensor) >= _SIZE_THRESHOLD:
            data = _raw_bytes(tensor)
            length, chunks = len(data), iter((data,))
        else:
            continue
        if length >= _ALIGN_THRESHOLD and offset % _ALIGN:
            pad = _ALIGN - offset % _ALIGN
            out.write(b"\0" * pad)
            offset += pad
        for chunk in chunks:
            out.write(chunk)
        _point_to(tensor, location, offset, length)
        offset += length


def _tensor_nbytes(tensor: onnx.TensorProto) -> int:
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    return _expected_nbytes(tensor) or 0


def _raw_bytes(tensor: onnx.TensorProto) -> bytes:
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    array = numpy_helper.to_array(tensor)
    return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def _file_chunks(path: Path, offset: int, length: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            chunk = f.read(min(_COPY_CHUNK, left))
            if not chunk:
                raise InvalidModelError(f"external data file {path.name!r} shrank while being copied")
            left -= len(chunk)
            yield chunk


def _point_to(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    tensor.data_location = _EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
