"""Python API: ``optimize`` a model in memory, and ``save_model`` it atomically.

``optimize`` is what ``python -m dehm_onnx optimize`` calls; the CLI adds nothing but file
handling and printing. Steps::

    load_model -> rewrite (CompressWeightsPass) -> _after_rewrite (verification hook)
               -> check_model -> (model, report)
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import onnx

from .config import OptimizeConfig, make_config
from .errors import ConfigError, InvalidModelError
from .graph.rewrite import CompressWeightsPass
from .report import Report

__all__ = ["optimize", "load_model", "save_model", "rewrite", "uses_external_data"]

logger = logging.getLogger(__name__)

# Models beyond protobuf's 2 GB limit must keep their tensors in an external file.
_PROTO_LIMIT = 2**31 - 1


def optimize(model_or_path, config: OptimizeConfig | None = None, **overrides):
    """Compress the constant MatMul/Gemm weights of a model into H-matrices.

    Args:
        model_or_path: an ``onnx.ModelProto`` (never modified; a copy is rewritten) or the
            path of an ``.onnx`` file.
        config: options; ``None`` means the defaults of ``OptimizeConfig``.
        **overrides: option values replacing those of ``config`` (e.g. ``tol=1e-2``).

    Returns:
        ``(model, report)``: the optimized ``onnx.ModelProto`` (it passes
        ``onnx.checker.check_model``) and the per-layer ``Report``.

    Raises:
        ConfigError: an option is unknown or out of range.
        InvalidModelError: the model is missing, unreadable or fails the ONNX checker.
        BoundViolation: a layer's output error on calibration data exceeds its ``tol_out``
            even after tightening (or the model misses ``max_model_error``); skip the check
            with ``no_verify=True``.
    """
    config = make_config(config, **overrides)
    original = load_model(model_or_path)
    optimized, report = rewrite(original, config)
    optimized, report = _after_rewrite(original, optimized, report, config)
    _check(optimized, "the optimized model")
    report.bytes_before = _size(model_or_path, original)
    report.bytes_after = optimized.ByteSize()
    return optimized, report


def rewrite(original: onnx.ModelProto, config: OptimizeConfig, layer_tols: dict[str, float] | None = None):
    """Run the compression pass on a copy of ``original``; return ``(model, report)``.

    ``layer_tols`` overrides ``config.tol`` for single layers (keyed by layer name), which
    lets a verification step recompress the layers that missed their output bound.
    """
    model = onnx.ModelProto()
    model.CopyFrom(original)
    result = CompressWeightsPass(config, layer_tols).call(model)
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

    Raises:
        InvalidModelError: the file is missing, is not ONNX, is truncated, or fails the checker.
    """
    if isinstance(model_or_path, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(model_or_path)
        _check(model, "the input model")
        return model
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise ConfigError(f"expected an onnx.ModelProto or a path, got {type(model_or_path).__name__}")
    path = Path(model_or_path)
    if not path.is_file():
        raise InvalidModelError(f"model file {str(path)!r} does not exist")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - protobuf raises several types for bad bytes
        raise InvalidModelError(f"{str(path)!r} is not a readable ONNX model ({type(e).__name__}: {_first_line(e)})") from e
    if not model.HasField("graph") or model.ir_version == 0:
        raise InvalidModelError(f"{str(path)!r} is not an ONNX model (no graph or IR version)")
    _check(model, f"model {str(path)!r}")
    return model


def _check(model: onnx.ModelProto, what: str) -> None:
    try:
        if model.ByteSize() < _PROTO_LIMIT:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise InvalidModelError(f"{what} fails the ONNX checker: {_first_line(e)}") from e


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _size(model_or_path, model: onnx.ModelProto) -> int:
    if isinstance(model_or_path, (str, os.PathLike)):
        return Path(model_or_path).stat().st_size
    return model.ByteSize()


def save_model(model: onnx.ModelProto, path, *, refuse: str | os.PathLike | None = None, external_data: bool = False) -> int:
    """Write ``model`` to ``path`` atomically: a temporary file beside it, then a rename.

    Args:
        model: the model to write.
        path: destination file.
        refuse: a path that must not be overwritten (the input model).
        external_data: store tensors in ``<path>.data`` beside the model (as the input did);
            forced for models over protobuf's 2 GB limit. That data file is written in
            place, before the model file is renamed into place.

    Returns:
        The size of the written file in bytes.

    Raises:
        ConfigError: ``path`` is the same file as ``refuse``.
        OSError: the folder does not exist or is not writable (nothing is left behind).
    """
    path = Path(path)
    if refuse is not None and same_file(path, Path(refuse)):
        raise ConfigError(f"output {str(path)!r} is the input model; choose another output path")
    folder = path.parent if str(path.parent) else Path(".")
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(handle)
    try:
        if external_data or model.ByteSize() >= _PROTO_LIMIT:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)  # saving as external data rewrites the tensors it is given
            onnx.save(copy, tmp, save_as_external_data=True, all_tensors_to_one_file=True, location=f"{path.name}.data")
        else:
            onnx.save(model, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    data = path.with_name(f"{path.name}.data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() and external_data else 0)


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


def same_file(a: Path, b: Path) -> bool:
    """True when two paths name the same file (existing or not)."""
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()
