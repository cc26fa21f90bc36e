"""Python API: ``optimize`` a model in memory, and ``save_model`` it atomically.

``optimize_file`` is what ``python -m dehm_onnx optimize`` calls; the CLI adds nothing but
printing. Steps::

    load_model -> rewrite (CompressWeightsPass on an onnx-ir model) -> _after_rewrite
               (verification hook) -> check_model -> (model, report)

The public functions take and return ``onnx.ModelProto`` (verification runs onnxruntime on
protos); the pass itself works on ``onnx_ir.Model``, converted here at the boundary
(``dehm_onnx.model_io``). ``optimize`` returns a self-contained model (external data is read
into memory, after validation); ``optimize_file`` keeps external weights in their files
until each is compressed and streams the rest to ``OUT.data`` (docs/big_models.md).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx
import onnx_ir as ir

from . import model_io
from .config import OptimizeConfig, make_config
from .errors import ConfigError, InvalidModelError
from .files import PathRole, check_paths, same_path, write_text
from .graph.inline import inline_weight_functions
from .graph.rewrite import CompressWeightsPass, select_candidates
from .report import Report

__all__ = ["optimize", "optimize_file", "load_model", "save_model", "rewrite", "model_files", "output_roles"]

logger = logging.getLogger(__name__)

_PROTO_LIMIT = model_io.PROTO_LIMIT
load_model = model_io.load_model


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
    original, defects = model_io.load_checked(model_or_path)
    if not config.no_verify:
        _probe_onnxruntime(original, config, _what(model_or_path))
    optimized, report = _rewrite_proto(original, config, progress)
    model_io.check_model(optimized, "the optimized model", carried=defects)
    report.notes.extend(d.describe() for d in defects)
    report.bytes_before = _size(model_or_path, original)
    report.bytes_after = optimized.ByteSize()
    return optimized, report


def _rewrite_proto(original: onnx.ModelProto, config: OptimizeConfig, progress):
    """Inline the functions that hold weights, compress, then verify (unless ``no_verify``)."""
    inlined_model, inlined = _inline_weight_functions(original)
    optimized, report = rewrite(inlined_model, config, progress=progress)
    optimized, report = _after_rewrite(inlined_model, optimized, report, config)
    report.inlined_functions = inlined
    return optimized, report


def rewrite(original: onnx.ModelProto, config: OptimizeConfig, layer_tols: dict[str, float] | None = None, progress=None):
    """Run the compression pass on a copy of ``original``; return ``(model, report)``.

    ``layer_tols`` overrides ``config.tol`` for single layers (keyed by layer name), which
    lets a verification step recompress the layers that missed their output bound.
    """
    model, report = _rewrite_ir(model_io.from_proto(original), config, layer_tols, progress)
    if not report.compressed and not report.inlined_functions:
        return original, report  # nothing changed: the model exactly as given
    return ir.serde.serialize_model(model), report


def _inline_weight_functions(original: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """The original with the functions that receive constant weights inlined, and their names.

    Done once, before the pass and its verification, so that the layers found inside those
    functions exist in the model the optimized one is verified against.
    """
    model = model_io.from_proto(original)
    inlined = inline_weight_functions(model)
    return (ir.serde.serialize_model(model), inlined) if inlined else (original, [])


def _rewrite_ir(model: ir.Model, config: OptimizeConfig, layer_tols=None, progress=None) -> tuple[ir.Model, Report]:
    """The pass on ``model`` in place (its ``ensures`` checks the wiring; the ONNX checker
    runs once on the final model, in ``optimize``/``optimize_file``)."""
    try:
        result = CompressWeightsPass(config, layer_tols, progress)(model)
    except ir.passes.PreconditionError as e:
        raise InvalidModelError(f"the model cannot be rewritten: {e.__cause__ or e}") from e
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
    try:
        _load_in_onnxruntime(model)
    except InvalidModelError as e:
        selection = select_candidates(model_io.from_proto(model), config)
        if config.max_model_error is None and all(id(c) in selection.skips for c in selection.candidates):
            return
        raise InvalidModelError(
            f"{what}: {e}; verification runs the model in onnxruntime, --no-verify (no_verify=True) "
            "skips it (the weight bounds still hold)"
        ) from e


def _load_in_onnxruntime(model: onnx.ModelProto) -> None:
    import onnxruntime as ort

    from .ops.library import make_session

    # One thread: creating the default thread pool costs more than loading a small model.
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # External weights are mapped from their files (the enclosing model_io.weights_from block).
    make_session(model, kernel="if_needed", sess_options=options, data_folder=model_io.session_data_folder(model))


def _input_roles(source, config: OptimizeConfig) -> list[PathRole]:
    return [PathRole("IN", source)] + [PathRole("--calibration", c) for c in config.calibration]


def model_files(path, role: str) -> list[PathRole]:
    """A model file and its external data files, as ``PathRole``s for ``files.check_paths``.

    Reads only the graph; a file that cannot be read is listed alone (its loader reports it).
    """
    roles = [PathRole(role, path)]
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
        files = model_io.data_files(model, Path(path).parent)
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
    model, defects = model_io.load_lazy(source)
    data_files = [PathRole("a data file of IN", f) for f in sorted(model_io.source_files(model))]
    check_paths(data_files, writes)
    data_bytes = model_io.external_bytes(model)
    with model_io.weights_from(source.parent):
        if config.no_verify:
            # No second look at the original: the pass runs on the lazy model itself.
            optimized, report = _rewrite_ir(model, config, progress=progress)
            optimized, report = _after_rewrite(None, optimized, report, config)
        else:
            # The original keeps its external references: the pass maps one weight at a time,
            # and onnxruntime maps them all from their files (verify.runner.make_cpu_session).
            original = ir.serde.serialize_model(model)
            _probe_onnxruntime(original, config, _what(input_path))
            optimized, report = _rewrite_proto(original, config, progress)
        model_io.check_model(optimized, "the optimized model", carried=defects)
        report.notes.extend(d.describe() for d in defects)
        # Tensors still in IN's data files are copied file to file into OUT.data.
        written = save_model(optimized, target, refuse=source, external_data=config.external_data or bool(data_bytes))
    report.bytes_before = source.stat().st_size + data_bytes
    report.bytes_after = written
    if report_path is not None:
        write_text(report_path, report.to_json() + "\n")
    return report


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _size(model_or_path, model: onnx.ModelProto) -> int:
    if isinstance(model_or_path, (str, os.PathLike)):
        return Path(model_or_path).stat().st_size
    return model.ByteSize()


def save_model(model, path, *, refuse: str | os.PathLike | None = None, external_data: bool = False) -> int:
    """Write ``model`` to ``path`` atomically (``dehm_onnx.files``): a temporary file beside
    it, ``fsync``, then a rename; new files get mode ``0o666`` less the umask.

    Args:
        model: the model to write (``onnx.ModelProto`` or ``onnx_ir.Model``).
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
    refused = [refuse] if refuse is not None else []
    return model_io.save_model(model, path, external=external_data, refuse=refused)
