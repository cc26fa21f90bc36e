"""Reading and writing model files, through onnx-ir.

Loading a file::

    bytes --onnx.load (no external data)--> ModelProto --validate_external_data--> (checked)
          --ir.serde.deserialize_model--> ir.Model (external tensors lazy, memory-mapped)

ONNX keeps tensors outside the ``.onnx`` file when ``data_location == EXTERNAL``; the tensor's
``external_data`` entries give ``location`` (a path relative to the model's folder),
``offset`` and ``length`` in bytes (see https://onnx.ai/onnx/repo-docs/ExternalData.html).
A hostile model can point those anywhere, so before any byte is read ``validate_external_data``
requires, for every external tensor of every graph and function:

- ``location`` is relative, has no ``..`` component, and resolves (symlinks followed) to a
  regular file inside the model's folder, with no other hard link (as onnx-ir requires);
- ``offset`` and ``length`` are non-negative integers with ``offset + length <= file size``,
  and ``length`` equals the size implied by the tensor's dims and type.

This runs on the raw entries, before onnx-ir parses them (it would accept duplicate keys,
and fails on some malformed ones with errors that do not name the problem). Failures
raise ``InvalidModelError`` naming the tensor. After that, onnx-ir reads weights lazily, one
at a time, so a model larger than memory can be optimized.

Saving (``save_model``) writes OUT and, when asked or needed, one data file ``OUT.data``
beside it, each tensor streaming itself into it (onnx-ir's ``tofile``: external tensors of
the input are copied file to file, never held in memory), both through
``dehm_onnx.files.StagedFile`` (temporary names, ``fsync``, renamed into place, the data
file first). It writes nothing outside OUT's folder and refuses to overwrite any file the
model reads from.

Verifying a model whose weights stay in their files (``api.optimize_file``): the protos
handed to verification keep their external references, and within a ``weights_from(folder)``
block ``from_proto`` reads them relative to that folder and onnxruntime sessions map them
from there (``session_data_folder``), so no weight is copied into this process.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import onnx
import onnx_ir as ir

from . import model_check
from .errors import ConfigError, InvalidModelError
from .files import StagedFile, atomic_output
from .graph.scan import first_non_text_name

__all__ = [
    "PROTO_LIMIT",
    "read_proto",
    "from_proto",
    "weights_from",
    "current_folder",
    "has_external_data",
    "session_data_folder",
    "data_files",
    "source_files",
    "stored_tensors",
    "validate_external_data",
    "load_model",
    "load_checked",
    "load_lazy",
    "check_model",
    "light_proto",
    "to_proto",
    "external_bytes",
    "data_file_name",
    "refuse_overwrite",
    "save_model",
]

logger = logging.getLogger(__name__)

# A serialized protobuf message cannot exceed 2 GB.
PROTO_LIMIT = 2**31 - 1
# Tensors at least this large go to the data file; smaller ones stay in the .onnx file.
_SIZE_THRESHOLD = 1024
# Large tensors start on a page boundary so that runtimes can memory-map them.
_ALIGN, _ALIGN_THRESHOLD = 4096, 1 << 20
# Tensors at most this large stay in the copy made for the ONNX checker and shape inference.
_LIGHT_BYTES = 1024

# The folder external tensors of in-memory protos are relative to (``weights_from``).
_DATA_FOLDER: contextvars.ContextVar[Path | None] = contextvars.ContextVar("dehm_data_folder", default=None)

# Element types stored two per byte.
_PACKED_4BIT = {
    getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)
}


def _graph_protos(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and its subgraphs, as protos (the raw entries the validation reads)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graph_protos(attr.g)
            for sub in attr.graphs:
                yield from _graph_protos(sub)


def _tensor_protos(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor proto: initializers and tensor attributes of all graphs and functions."""
    nodes = [n for f in model.functions for n in f.node]
    for graph in _graph_protos(model.graph):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        nodes += list(graph.node)
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors


def _external_protos(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in _tensor_protos(model) if t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL]


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
    if info.st_nlink > 1:
        # onnx-ir refuses to read such a file (a hard link can bring any file of the disk into
        # the folder); refusing it here says so before anything is read, on every path.
        raise InvalidModelError(
            f"tensor {name!r}: external data file {location!r} has {info.st_nlink} hard links; use a copy of it"
        )
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
    return sum(_resolve(t, folder)[2] for t in _external_protos(model))


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextlib.contextmanager
def weights_from(folder: str | os.PathLike | None):
    """Within the block, external tensors of in-memory protos are relative to ``folder``.

    For protos that keep the external references of a model loaded from ``folder`` (validated
    by ``read_proto``): ``from_proto`` gives their tensors that base folder, and
    ``session_data_folder`` tells onnxruntime where to map them from.
    """
    token = _DATA_FOLDER.set(Path(folder).resolve() if folder is not None else None)
    try:
        yield
    finally:
        _DATA_FOLDER.reset(token)


def current_folder() -> Path | None:
    """The folder of the innermost ``weights_from`` block (None outside any)."""
    return _DATA_FOLDER.get()


def has_external_data(proto: onnx.ModelProto) -> bool:
    """Whether some tensor of ``proto`` (any graph or function) lives in an external file."""
    return bool(_external_protos(proto))


def session_data_folder(proto: onnx.ModelProto) -> Path | None:
    """The folder onnxruntime reads ``proto``'s external tensors from; None when it has none.

    Raises:
        InvalidModelError: ``proto`` has external tensors outside any ``weights_from`` block.
    """
    if not has_external_data(proto):
        return None
    folder = current_folder()
    if folder is None:
        raise InvalidModelError("the model keeps tensors in external data, but its folder is unknown; load it from its path")
    return folder


def read_proto(path) -> onnx.ModelProto:
    """Parse a model file without its external data, and validate that data's locations.

    Raises:
        InvalidModelError: the file is missing, is not ONNX, is truncated, or names external
            data that escapes its folder or does not fit its file.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidModelError(f"model file {str(path)!r} does not exist")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several types for bad bytes
        raise InvalidModelError(f"{str(path)!r} is not a readable ONNX model ({type(e).__name__}: {_first_line(e)})") from e
    if not proto.HasField("graph") or proto.ir_version == 0:
        raise InvalidModelError(f"{str(path)!r} is not an ONNX model (no graph or IR version)")
    validate_external_data(proto, path.parent)
    return proto


def _value_info_names(proto: onnx.ModelProto) -> set[str]:
    return {v.name for g in _graph_protos(proto.graph) for v in (*g.value_info, *g.input, *g.output)}


def _checked(proto: onnx.ModelProto, what: str) -> tuple[ir.Model, list[model_check.Defect]]:
    """``from_proto`` after the checks of an input model (names, tensor sizes, ONNX checker),
    with the checker defects tolerated (``dehm_onnx.model_check``), each logged."""
    bad_name = _first_bytes_name(proto)
    if bad_name is not None:
        raise InvalidModelError(f"{what} has a name that is not valid UTF-8: {bad_name!r}")
    _check_tensor_sizes(proto)
    defects = _check_proto(proto, what)
    for defect in defects:
        logger.warning("%s: %s", what, defect.describe())
    return from_proto(proto, what), defects


def from_proto(proto: onnx.ModelProto, what: str = "the model") -> ir.Model:
    """The ir model of ``proto``; its initializers state their type only where ``proto`` did.

    onnx-ir gives every initializer a type, and would write a ``value_info`` for each;
    clearing the ones the file did not have keeps a saved model as small as its source.
    External tensors are read relative to the ``weights_from`` folder, when one is set.
    """
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as e:  # noqa: BLE001 - inconsistent protos fail in many ways
        raise InvalidModelError(f"{what} cannot be read ({type(e).__name__}: {_first_line(e)})") from e
    folder = current_folder()
    if folder is not None:
        ir.external_data.set_base_dir(model.graph, str(folder))
    described = _value_info_names(proto)
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.name not in described:
                value.type, value.shape = None, None
    return model


def _check_proto(proto: onnx.ModelProto, what: str, carried=None) -> list[model_check.Defect]:
    """The ONNX checker on the model as given (onnx-ir would silently repair some errors,
    such as two initializers of one name), no stricter than onnxruntime (``model_check``);
    external tensors become empty stubs in a copy, their locations having been validated
    already. Returns the defects tolerated."""
    if _external_protos(proto):
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        for tensor in _external_protos(copy):
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.dims[:] = [0] * len(tensor.dims)
        proto = copy
    if proto.ByteSize() >= PROTO_LIMIT:
        return []
    return model_check.check_model(proto, what, carried=carried)


def _check_tensor_sizes(proto: onnx.ModelProto) -> None:
    """Every in-file tensor has a known type and, in ``raw_data``, the bytes its dims need.

    The ONNX checker lets both through; onnx-ir would fail on them only when the weight is
    read, or keep them as they are.
    """
    for tensor in _tensor_protos(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        expected = _expected_nbytes(tensor)
        if expected is not None and tensor.HasField("raw_data") and len(tensor.raw_data) != expected:
            raise InvalidModelError(
                f"tensor {tensor.name!r} has {len(tensor.raw_data)} bytes of raw_data, its dims {list(tensor.dims)} need {expected}"
            )


def _first_bytes_name(proto: onnx.ModelProto):
    """A name protobuf handed over as bytes (not valid UTF-8), or None (checked on the ir names too)."""
    for graph in _graph_protos(proto.graph):
        for node in graph.node:
            for text in (node.name, node.op_type, node.domain, *node.input, *node.output):
                if not isinstance(text, str):
                    return text
    return None


def load_lazy(path) -> tuple[ir.Model, list[model_check.Defect]]:
    """Load a model file whose external tensors stay in their files until read, and check it.

    Returns:
        The model and the checker defects tolerated (``dehm_onnx.model_check``).

    Raises:
        InvalidModelError: as ``read_proto``, or the model fails the ONNX checker.
    """
    path = Path(path)
    model, defects = _checked(read_proto(path), f"model {str(path)!r}")
    ir.external_data.set_base_dir(model.graph, str(path.parent.resolve()))
    return model, defects


def load_model(model_or_path) -> onnx.ModelProto:
    """A self-contained, checked ``ModelProto`` of a model (external data read into memory).

    The checker is applied no more strictly than onnxruntime loads models: the defects listed
    in ``dehm_onnx.model_check`` are tolerated, with a warning naming each.

    Args:
        model_or_path: an ``onnx.ModelProto`` (returned as it is once checked) or a path.

    Raises:
        ConfigError: neither a ModelProto nor a path.
        InvalidModelError: as ``load_lazy``.
    """
    return load_checked(model_or_path)[0]


def load_checked(model_or_path) -> tuple[onnx.ModelProto, list[model_check.Defect]]:
    """``load_model`` and the checker defects it tolerated."""
    if isinstance(model_or_path, onnx.ModelProto):
        model, defects = _checked(model_or_path, "the input model")
        external = _external_slots(model)
        if external:
            raise InvalidModelError(
                f"tensor {external[0].tensor.name!r} is stored in external data, but the model's folder is unknown "
                "(load the model from its path)"
            )
        return model_or_path, defects
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise ConfigError(f"expected an onnx.ModelProto or a path, got {type(model_or_path).__name__}")
    model, defects = load_lazy(model_or_path)
    return to_proto(model), defects


class _Slot:
    """Where a model keeps one tensor: an initializer, or a node's tensor attribute."""

    def __init__(self, value: ir.Value | None = None, node: ir.Node | None = None, attr: str = ""):
        self.value, self.node, self.attr = value, node, attr

    @property
    def tensor(self):
        return self.value.const_value if self.value is not None else self.node.attributes[self.attr].value

    @tensor.setter
    def tensor(self, tensor) -> None:
        if self.value is not None:
            self.value.const_value = tensor
        else:
            self.node.attributes[self.attr] = ir.AttrTensor(self.attr, tensor)


def _slots(model: ir.Model) -> list[_Slot]:
    """Every tensor the model stores: initializers and tensor attributes, subgraphs and functions."""
    slots = [_Slot(value=v) for graph in model.graphs() for v in graph.initializers.values() if v.const_value is not None]
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    nodes += [n for f in model.functions.values() for n in ir.traversal.RecursiveGraphIterator(f)]
    for node in nodes:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.TENSOR and attr.value is not None:
                slots.append(_Slot(node=node, attr=attr.name))
    return slots


def stored_tensors(model) -> list:
    """Every tensor a model stores (``ir`` tensors; a ``ModelProto`` is read, not copied):
    initializers and tensor attributes of all graphs and model-local functions."""
    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)
    return [s.tensor for s in _slots(model)]


def _external_slots(model: ir.Model) -> list[_Slot]:
    return [s for s in _slots(model) if isinstance(s.tensor, ir.ExternalTensor)]


def _stub(tensor) -> ir.Tensor:
    """An empty tensor of ``tensor``'s type and rank (all dimensions 0)."""
    shape = (0,) * len(tensor.shape)
    try:
        return ir.Tensor(np.zeros(shape, dtype=tensor.dtype.numpy()), dtype=tensor.dtype, name=tensor.name)
    except Exception:  # noqa: BLE001 - types numpy cannot hold keep their values
        return tensor


def light_proto(model: ir.Model) -> onnx.ModelProto:
    """``model`` as a proto whose large or external initializers are empty stubs.

    For the ONNX checker and shape inference, which need the graph but not the weights (the
    external locations were validated when the model was loaded). ``model`` is unchanged.
    """
    swapped = []
    for slot in _slots(model):
        tensor = slot.tensor
        if isinstance(tensor, ir.ExternalTensor) or tensor.nbytes > _LIGHT_BYTES:
            swapped.append((slot, tensor))
            slot.tensor = _stub(tensor)
    try:
        return ir.serde.serialize_model(model)
    finally:
        for slot, tensor in swapped:
            slot.tensor = tensor


def check_model(model, what: str, carried=None) -> list[model_check.Defect]:
    """Run the ONNX checker on ``model`` (``ir.Model``, weights left out, see ``light_proto``;
    or an in-memory ``ModelProto``), tolerating only the ``carried`` defects of its input.

    Raises:
        InvalidModelError: a name is not valid UTF-8 or the checker fails.
    """
    if isinstance(model, onnx.ModelProto):
        return _check_proto(model, what, carried)
    bad_name = first_non_text_name(model)
    if bad_name is not None:
        raise InvalidModelError(f"{what} has a name that is not valid UTF-8: {bad_name!r}")
    try:
        proto = light_proto(model)
    except Exception as e:  # noqa: BLE001 - an inconsistent model fails to serialize in many ways
        raise InvalidModelError(f"{what} cannot be written as ONNX ({type(e).__name__}: {_first_line(e)})") from e
    return _check_proto(proto, what, carried)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """``model`` as a self-contained ``ModelProto`` (external tensors are read into memory)."""
    ir.external_data.load_to_model(model)
    for slot in _external_slots(model):  # tensor attributes (Constant nodes)
        slot.tensor = ir.external_data.convert_tensors_from_external([slot.tensor])[0]
    return ir.serde.serialize_model(model)


def external_bytes(model: ir.Model) -> int:
    """Total bytes of the model's external tensors (no file access)."""
    return sum(int(s.tensor.nbytes) for s in _external_slots(model))


def data_file_name(output: str | os.PathLike) -> str:
    """Name of OUT's external data file (beside OUT)."""
    return f"{Path(output).name}.data"


def source_files(model: ir.Model) -> set[Path]:
    """The resolved paths of the data files a loaded model's external tensors live in."""
    return {Path(s.tensor.path).resolve() for s in _external_slots(model)}


def data_files(model: onnx.ModelProto, folder: str | os.PathLike) -> set[Path]:
    """The resolved paths of the files a model's external tensors live in (validated first).

    Raises:
        InvalidModelError: as ``validate_external_data``.
    """
    return {_resolve(t, Path(folder))[0] for t in _external_protos(model)}


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def refuse_overwrite(model: ir.Model, output: str | os.PathLike, refuse=()) -> None:
    """Raise ``ConfigError`` when OUT or OUT.data is a file the model reads from (or in ``refuse``)."""
    output = Path(output)
    sources = source_files(model) | {Path(r).resolve() for r in refuse}
    for target in (output.with_name(data_file_name(output)), output):
        if target.resolve() in sources or any(_same(target, s) for s in sources):
            raise ConfigError(
                f"output file {str(target)!r} is a data file the input model uses; choose another output name"
            )


def _in_memory_bytes(model: ir.Model) -> int:
    return sum(int(s.tensor.nbytes) for s in _slots(model) if not isinstance(s.tensor, ir.ExternalTensor))


def save_model(model, path: str | os.PathLike, *, external: bool, refuse=()) -> int:
    """Write ``model`` (``ir.Model`` or ``ModelProto``) to ``path``, tensors in ``path.data`` when ``external``.

    A model with external tensors (lazily loaded), or too large for one protobuf message,
    is always written with external data: initializers of at least ``_SIZE_THRESHOLD``
    bytes go to ``OUT.data`` (those of the input's data files copied file to file), the
    rest stays in OUT. Both files are written to temporary names in OUT's folder and
    renamed into place, the data file first. ``model`` is not modified.

    Returns:
        Bytes written (OUT plus OUT.data).

    Raises:
        ConfigError: ``path.data`` is a file the model reads from, or one of ``refuse``.
        OSError: the folder is missing or not writable (nothing is left behind).
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if isinstance(model, onnx.ModelProto):
        if not external and model.ByteSize() < PROTO_LIMIT:
            with atomic_output(path) as out:
                out.write(model.SerializeToString())
            return path.stat().st_size
        model = from_proto(model)
    if not (external or _external_slots(model) or _in_memory_bytes(model) >= PROTO_LIMIT):
        with atomic_output(path) as out:
            out.write(ir.serde.serialize_model(model).SerializeToString())
        return path.stat().st_size
    refuse_overwrite(model, path, refuse)
    data_path = folder / data_file_name(path)
    data = StagedFile(data_path)
    try:
        staged = StagedFile(path)
        try:
            proto = _write_tensors(model, data.file, data_path.name, folder)
            staged.file.write(proto.SerializeToString())
            data.finish()
            staged.finish()  # both on disk before either is renamed into place
            data.commit()
            staged.commit()
        finally:
            staged.discard()
    finally:
        data.discard()
    return path.stat().st_size + data_path.stat().st_size


def _write_tensors(model: ir.Model, out, location: str, folder: Path) -> onnx.ModelProto:
    """Stream the large tensors into ``out``; return the proto that names them in ``location``.

    Each tensor writes itself (``tofile``: an external one is copied file to file by the
    kernel, never held in memory); tensors of ``_ALIGN_THRESHOLD`` bytes or more start on an
    ``_ALIGN`` boundary. ``model`` is unchanged.
    """
    slots = [
        s for s in _slots(model)
        if isinstance(s.tensor, ir.ExternalTensor) or (s.tensor.dtype != ir.DataType.STRING and s.tensor.nbytes >= _SIZE_THRESHOLD)
    ]
    tensors = [s.tensor for s in slots]
    offset = 0
    try:
        for slot, tensor in zip(slots, tensors):
            length = int(tensor.nbytes)
            if length >= _ALIGN_THRESHOLD and offset % _ALIGN:
                out.write(b"\0" * (_ALIGN - offset % _ALIGN))
                offset += _ALIGN - offset % _ALIGN
            tensor.tofile(out)
            slot.tensor = ir.ExternalTensor(
                location, offset, length, tensor.dtype, shape=tensor.shape, name=tensor.name, base_dir=str(folder)
            )
            offset += length
        if out.tell() != offset:
            raise InvalidModelError(f"external data written to {location!r} has {out.tell()} bytes, expected {offset}")
        return ir.serde.serialize_model(model)
    finally:
        for slot, tensor in zip(slots, tensors):
            slot.tensor = tensor
