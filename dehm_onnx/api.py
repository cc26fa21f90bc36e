"""Python API: ``optimize`` a model in memory, and ``save_model`` it atomically.

``optimize_file`` is what ``python -m dehm_onnx optimize`` calls; the CLI adds nothing but
printing. Steps::

    load_model -> rewrite (CompressWeightsPass) -> _after_rewrite (verification hook)
               -> check_model -> (model, report)

``optimize`` returns a self-contained model (external data is read into memory, after
validation); ``optimize_file`` keeps external weights in their files until each is compressed
and streams the rest to ``OUT.data`` (docs/big_models.md).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx

from . import model_check
from .config import OptimizeConfig, make_config
from .errors import ConfigError, InvalidModelError
from .files import PathRole, check_paths, same_path, write_text
from .graph import external
from .graph.rewrite import CompressWeightsPass
from .graph.scan import first_non_text_name
from .report import Report

__all__ = ["optimize", "optimize_file", "load_model", "save_model", "rewrite", "uses_external_data"]

logger = logging.getLogger(__name__)

# Models beyond protobuf's 2 GB limit must keep their tensors in an external file.
_PROTO_LIMIT = external.PROTO_LIMIT


def optimize(model_or_path, config: OptimizeConfig | None = None, *, progress=None, **overrides):
    """Compress the constant MatMul/Gemm weights of a model into H-matrices.

    Args:
        model_or_path: an ``onnx.ModelProto`` (never modified; a copy is rewritten) or the
            path of an ``.onnx`` file.
        config: options; ``None`` means the defaults of ``OptimizeConfig``.
        progress: optional ``dehm_onnx.progress.ProgressBar`` updated per compressed layer.
        **overrides: option values replacing those of ``config`` (e.g. ``tol=1e-2``).

    Returns:
        ``(model, report)``: the optimized ``onnx.ModelProto`` (it passes
        ``onnx.checker.check_model``, up to the input's own tolerated defects, see
        ``dehm_onnx.model_check``) and the per-layer ``Report`` (``report.notes`` says
        what was tolerated).

    Raises:
        ConfigError: an option is unknown or out of range.
        InvalidModelError: the model is missing, unreadable or fails the ONNX checker, or
            (when verifying) onnxruntime cannot load it.
        BoundViolation: a layer's output error on calibration data exceeds its ``tol_out``
            even after tightening (or the model misses ``max_model_error``); skip the check
            with ``no_verify=True``.
    """
    config = make_config(config, **overrides)
    original, defects = _load(model_or_path)
    if not config.no_verify:
        _probe_onnxruntime(original, config, _what(model_or_path))
    optimized, report = rewrite(original, config, progress=progress)
    optimized, report = _after_rewrite(original, optimized, report, config)
    _check(optimized, "the optimized model", carried=defects)
    report.notes.extend(d.describe() for d in defects)
    report.bytes_before = _size(model_or_path, original)
    report.bytes_after = optimized.ByteSize()
    return optimized, report


def rewrite(original: onnx.ModelProto, config: OptimizeConfig, layer_tols: dict[str, float] | None = None, progress=None):
    """Run the compression pass on a copy of ``original``; return ``(model, report)``.

    ``layer_tols`` overrides ``config.tol`` for single layers (keyed by layer name), which
    lets a verification step recompress the layers that missed their output bound.
    """
    model = onnx.ModelProto()
    model.CopyFrom(original)
    result = CompressWeightsPass(config, layer_tols, progress).call(model)
    return result.model, result.report


def _after_rewrite(original: onnx.ModelProto, optimized: onnx.ModelProto, report: Report, config: OptimizeConfig):
    """Hook between the rewrite and the final check; returns ``(model, report)``.

    This is where output-error verification belongs: measure each compressed layer on
    calibration inputs, call ``rewrite(original, config, layer_tols)`` with tighter tols
    for layers over their bound, and raise ``BoundViolation`` if that does not suffice.
    The verifier is ``dehm_onnx.verify.tighten.verify_and_tighten``.
    """
    from .verify.tighten import verify_and_tighten

    return verify_and_tighten(original, optimized, report, config, rewrite)


def load_model(model_or_path) -> onnx.ModelProto:
    """Load (or copy) a model and check it with ``onnx.checker``.

    The checker is applied no more strictly than onnxruntime loads models: the defects listed
    in ``dehm_onnx.model_check`` are tolerated, with a warning naming each.

    Raises:
        InvalidModelError: the file is missing, is not ONNX, is truncated, or fails the checker.
    """
    return _load(model_or_path)[0]


def _load(model_or_path) -> tuple[onnx.ModelProto, list[model_check.Defect]]:
    if isinstance(model_or_path, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(model_or_path)
        return model, _check_input(model, "the input model")
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise ConfigError(f"expected an onnx.ModelProto or a path, got {type(model_or_path).__name__}")
    path = Path(model_or_path)
    model, defects = _load_lazy(path)
    external.materialize(model, path.parent)
    return model, defects


def load_model_lazy(path) -> onnx.ModelProto:
    """Load the graph of a model file without its external data, and check it.

    Every external tensor's location, offset and length are validated against the model's
    folder before anything is read from them (``dehm_onnx.graph.external``); the tensors
    keep pointing at their files.

    Raises:
        InvalidModelError: as ``load_model``, or external data that escapes the model's
            folder or does not fit its file.
    """
    return _load_lazy(Path(path))[0]


def _load_lazy(path: Path) -> tuple[onnx.ModelProto, list[model_check.Defect]]:
    if not path.is_file():
        what = "is a folder, not a model file" if path.is_dir() else "does not exist"
        raise InvalidModelError(f"model file {str(path)!r} {what}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several types for bad bytes
        raise InvalidModelError(f"{str(path)!r} is not a readable ONNX model ({type(e).__name__}: {_first_line(e)})") from e
    if not model.HasField("graph") or model.ir_version == 0:
        raise InvalidModelError(f"{str(path)!r} is not an ONNX model (no graph or IR version)")
    defects = _check_input(model, f"model {str(path)!r}")
    external.validate_external_data(model, path.parent)
    return model, defects


def _check_input(model: onnx.ModelProto, what: str) -> list[model_check.Defect]:
    defects = _check(model, what)
    for defect in defects:
        logger.warning("%s: %s", what, defect.describe())
    return defects


def _what(model_or_path) -> str:
    if isinstance(model_or_path, (str, os.PathLike)):
        return f"model {os.fspath(model_or_path)!r}"
    return "the input model"


def _probe_onnxruntime(model: onnx.ModelProto, config: OptimizeConfig, what: str) -> None:
    """Refuse, before any work, a model that verification would have to run and cannot.

    Verification runs the original in onnxruntime when a layer gets compressed (or for
    ``max_model_error``); a model with no candidate left after the pass's own pre-checks
    (names, dtype, size, ...) has nothing to verify and is not refused.
    """
    from .graph.rewrite import select_candidates

    try:
        _load_in_onnxruntime(model)
    except InvalidModelError as e:
        candidates, _, skips = select_candidates(model, config)
        if config.max_model_error is None and all(id(c) in skips for c in candidates):
            return
        raise InvalidModelError(
            f"{what}: {e}; verification runs the model in onnxruntime, --no-verify (no_verify=True) "
            "skips it (the weight bounds still hold)"
        ) from e


def _load_in_onnxruntime(model: onnx.ModelProto) -> None:
    import onnxruntime as ort

    from .verify.runner import make_cpu_session

    if model.ByteSize() < _PROTO_LIMIT and not external.external_tensors(model):
        # One thread: creating the default thread pool costs more than loading a small model.
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            return
        except Exception:  # noqa: BLE001 - make_cpu_session says why, or loads the HMatMul library
            pass
    make_cpu_session(model)


def _input_roles(source, config: OptimizeConfig) -> list[PathRole]:
    return [PathRole("IN", source)] + [PathRole("--calibration", c) for c in config.calibration]


def model_files(path, role: str) -> list[PathRole]:
    """A model file and its external data files, as ``PathRole``s for ``files.check_paths``.

    Reads only the graph; a file that cannot be read is listed alone (its loader reports it).
    """
    roles = [PathRole(role, path)]
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
        files = external.data_files(model, Path(path).parent)
    except Exception:  # noqa: BLE001 - unreadable models are refused by the loader, with its message
        return roles
    return roles + [PathRole(f"a data file of {role}", f) for f in sorted(files)]


def output_roles(output_path, report_path=None) -> list[PathRole]:
    """The files ``optimize_file`` may write: OUT, OUT.data (reserved even when not written)
    and the JSON report."""
    data = os.fspath(output_path) + ".data"  # spelled as the user spelled OUT
    roles = [PathRole("OUT", output_path), PathRole("OUT.data", data)]
    if report_path is not None:
        roles.append(PathRole("--report", report_path))
    return roles


def optimize_file(
    input_path, output_path, config: OptimizeConfig | None = None, *, progress=None, report_path=None, **overrides
) -> Report:
    """Optimize the model file ``input_path`` into ``output_path``, with bounded memory.

    External weights stay in their files and are memory-mapped one at a time when their
    layer is compressed; the output keeps its tensors in ``OUT.data`` when the input had
    external data, when ``config.external_data`` is set, or when it exceeds 2 GB. Options,
    verification and errors are those of ``optimize``. Verification runs both models in
    onnxruntime with their external weights memory-mapped from the files (never read into
    this process), so a model of any size is verified by default (docs/big_models.md).

    Before any work, every file it will write (OUT, ``OUT.data``, ``report_path``) must lie
    in an existing folder, not be a folder, and differ from every file it reads (IN, IN's
    external data files, calibration files) and from each other (``dehm_onnx.files``).

    Args:
        report_path: also write the report as JSON there (after OUT).

    Returns:
        The per-layer ``Report`` (``bytes_before``/``bytes_after`` include the data files).

    Raises:
        ConfigError, InvalidModelError, BoundViolation: as ``optimize``; ``ConfigError`` also
            when an output path is refused as above.
    """
    config = make_config(config, **overrides)
    source, target = Path(input_path), Path(output_path)
    writes = output_roles(output_path, report_path)
    check_paths(_input_roles(input_path, config), writes)  # before reading anything
    original, defects = _load_lazy(source)
    data_files = [PathRole("a data file of IN", f) for f in sorted(external.data_files(original, source.parent))]
    check_paths(data_files, writes)
    data_bytes = external.external_bytes(original)
    with external.weights_from(source.parent):
        # onnxruntime reads external weights memory-mapped from source.parent (verify.runner).
        if not config.no_verify:
            _probe_onnxruntime(original, config, _what(input_path))
        optimized, report = rewrite(original, config, progress=progress)
        optimized, report = _after_rewrite(original, optimized, report, config)
        _check(optimized, "the optimized model", carried=defects)
        report.notes.extend(d.describe() for d in defects)
        written = save_model(optimized, target, refuse=source, external_data=config.external_data or bool(data_bytes))
    report.bytes_before = source.stat().st_size + data_bytes
    report.bytes_after = written
    if report_path is not None:
        write_text(report_path, report.to_json() + "\n")
    return report


def _check(model: onnx.ModelProto, what: str, carried: list[model_check.Defect] | None = None) -> list[model_check.Defect]:
    """Check names and run the ONNX checker; return the tolerated defects (``model_check``)."""
    bad_name = first_non_text_name(model)
    if bad_name is not None:
        raise InvalidModelError(f"{what} has a name that is not valid UTF-8: {bad_name!r}")
    if external.external_tensors(model):
        model = external.checkable_copy(model)  # locations are validated separately
    if model.ByteSize() >= _PROTO_LIMIT:
        return []
    return model_check.check_model(model, what, carried=carried)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _size(model_or_path, model: onnx.ModelProto) -> int:
    if isinstance(model_or_path, (str, os.PathLike)):
        return Path(model_or_path).stat().st_size
    return model.ByteSize()


def save_model(model: onnx.ModelProto, path, *, refuse: str | os.PathLike | None = None, external_data: bool = False) -> int:
    """Write ``model`` to ``path`` atomically (``dehm_onnx.files``): a temporary file beside
    it, ``fsync``, then a rename; new files get mode ``0o666`` less the umask.

    Args:
        model: the model to write.
        path: destination file.
        refuse: a path that must not be overwritten (the input model).
        external_data: store tensors in ``<path>.data`` beside the model (as the input did);
            forced for models over protobuf's 2 GB limit and for models whose tensors still
            point at the input's data files. The data file is renamed into place just
            before the model file.

    Returns:
        The size of the written files in bytes (model plus data file).

    Raises:
        ConfigError: ``path`` is the same file as ``refuse``, or ``<path>.data`` is a file
            the model reads from.
        OSError: the folder does not exist or is not writable (nothing is left behind).
    """
    path = Path(path)
    if refuse is not None and same_path(path, refuse):
        raise ConfigError(f"output {str(path)!r} is the input model; choose another output path")
    # Tensors still in the input's data files (``optimize_file``) are copied to ``<path>.data``.
    big = not external_data and not external.external_tensors(model) and model.ByteSize() >= _PROTO_LIMIT
    refused = [refuse] if refuse is not None else []
    return external.write_model(model, path, external=external_data or big, refuse=refused)


def uses_external_data(path) -> bool:
    """True when the model file at ``path`` keeps some initializer in an external file."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - an unreadable file is reported by load_model
        return False
    return any(
        onnx.external_data_helper.uses_external_data(t)
        for t in onnx.external_data_helper._get_all_tensors(model)  # noqa: SLF001 - includes subgraphs
    )
