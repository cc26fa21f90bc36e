"""Calibration inputs: the samples on which layer and model errors are measured.

A calibration set maps every graph input name to an array whose first axis indexes samples;
sample ``i`` feeds ``arrays[name][i]`` to the model. Two sources:

* generated from the model's input signature (``generate_calibration``): floats are standard
  normal, integers uniform in ``[LO, HI]`` (both ends included; ``--input-range name=LO:HI``,
  default ``DEFAULT_INT_RANGE``), booleans fair coin flips; all seeded. Dynamic dimensions take
  their size from ``--input-shape name=1x128`` or, if absent, ``DEFAULT_BATCH_DIM`` for the
  first axis and ``DEFAULT_DYNAMIC_DIM`` for any other axis.
* loaded from the user's ``.npz`` files (``load_calibration``): arrays keyed by input name,
  first axis = samples. An array with one axis more than the input is split along that axis;
  an array with the input's own rank is split along its first axis, each sample keeping it
  with size 1 (so ``(100, 128)`` for an input ``[batch, 128]`` is 100 samples of ``(1, 128)``).
  Several files are concatenated along the sample axis.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from ..config import DEFAULT_NUM_SAMPLES
from ..errors import ConfigError

__all__ = [
    "DEFAULT_BATCH_DIM",
    "DEFAULT_DYNAMIC_DIM",
    "DEFAULT_INT_RANGE",
    "DEFAULT_NUM_SAMPLES",
    "CalibrationSet",
    "InputSpec",
    "generate_calibration",
    "input_specs",
    "load_calibration",
    "parse_input_ranges",
    "parse_input_shapes",
    "resolve_calibration",
]

DEFAULT_BATCH_DIM = 1
DEFAULT_DYNAMIC_DIM = 64
DEFAULT_INT_RANGE = (0, 9)

_SHAPE_RE = re.compile(r"^\s*([^=]+?)\s*=\s*(\d+(?:\s*[x,]\s*\d+)*)?\s*$")
_RANGE_RE = re.compile(r"^\s*([^=]+?)\s*=\s*(-?\d+)\s*:\s*(-?\d+)\s*$")


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A graph input as calibration sees it: name, numpy dtype and shape (None = dynamic)."""

    name: str
    dtype: np.dtype
    shape: tuple  # ints, or None for a dynamic dimension


@dataclasses.dataclass
class CalibrationSet:
    """Calibration samples: ``arrays[name][i]`` is input ``name`` of sample ``i``.

    Attributes:
        arrays: input name -> array with samples on axis 0 (all the same number of samples).
        source: a short description ("generated, seed 0" or the file names) for reports.
    """

    arrays: dict
    source: str = ""

    def __post_init__(self):
        counts = {name: len(a) for name, a in self.arrays.items()}
        if not counts:
            raise ConfigError("calibration set has no inputs")
        if len(set(counts.values())) != 1:
            raise ConfigError(f"calibration inputs have different sample counts: {counts}")
        if next(iter(counts.values())) == 0:
            raise ConfigError("calibration set has no samples")

    @property
    def num_samples(self) -> int:
        """Number of samples (the common length of every array's first axis)."""
        return len(next(iter(self.arrays.values())))

    def samples(self) -> Iterator[dict]:
        """Yield one feed dict (input name -> array) per sample."""
        for i in range(self.num_samples):
            yield {name: np.asarray(a[i]) for name, a in self.arrays.items()}


def _numpy_dtype(elem_type: int) -> np.dtype:
    from onnx import helper

    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


def input_specs(model) -> list[InputSpec]:
    """The true inputs of ``model`` (graph inputs that are not initializers), as InputSpecs.

    Raises:
        ConfigError: an input is not a tensor.
    """
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if not value.type.HasField("tensor_type"):
            raise ConfigError(f"input {value.name!r} is not a tensor; calibration needs tensors")
        tensor_type = value.type.tensor_type
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim
        )
        specs.append(InputSpec(value.name, _numpy_dtype(tensor_type.elem_type), dims))
    return specs


def parse_input_shapes(items: Sequence[str] | None) -> dict:
    """Parse ``name=1x128`` strings (``name=`` for a scalar) into {name: (1, 128)}.

    Raises:
        ConfigError: an item is not of the form NAME=D1xD2x...
    """
    shapes = {}
    for item in items or ():
        match = _SHAPE_RE.match(item)
        if not match:
            raise ConfigError(f"--input-shape must look like NAME=1x128, got {item!r}")
        dims = match.group(2)
        shapes[match.group(1)] = tuple(int(d) for d in re.split(r"\s*[x,]\s*", dims)) if dims else ()
    return shapes


def parse_input_ranges(items: Sequence[str] | None) -> dict:
    """Parse ``name=LO:HI`` strings into {name: (LO, HI)} (both ends included).

    Raises:
        ConfigError: an item is malformed or LO > HI.
    """
    ranges = {}
    for item in items or ():
        match = _RANGE_RE.match(item)
        if not match:
            raise ConfigError(f"--input-range must look like NAME=LO:HI with integers, got {item!r}")
        lo, hi = int(match.group(2)), int(match.group(3))
        if lo > hi:
            raise ConfigError(f"--input-range {item!r}: LO {lo} > HI {hi}")
        ranges[match.group(1)] = (lo, hi)
    return ranges


def _check_known_names(kind: str, given: Mapping, specs: Sequence[InputSpec]) -> None:
    names = [s.name for s in specs]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ConfigError(f"{kind} names unknown input(s) {unknown}; the model's inputs are {names}")


def _resolve_shape(spec: InputSpec, override) -> tuple:
    if override is None:
        return tuple(
            d if d is not None else (DEFAULT_BATCH_DIM if axis == 0 else DEFAULT_DYNAMIC_DIM)
            for axis, d in enumerate(spec.shape)
        )
    override = tuple(override)
    if len(override) != len(spec.shape):
        raise ConfigError(
            f"--input-shape for {spec.name!r} has {len(override)} dims {override}, "
            f"the model's input has {len(spec.shape)} {_show_shape(spec.shape)}"
        )
    for axis, (want, got) in enumerate(zip(spec.shape, override)):
        if want is not None and want != got:
            raise ConfigError(
                f"--input-shape for {spec.name!r} sets axis {axis} to {got}, "
                f"but the model fixes it to {want} {_show_shape(spec.shape)}"
            )
    return override


def _show_shape(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _is_extended_float(dtype: np.dtype) -> bool:
    # bfloat16 and float8 types come from ml_dtypes as numpy "void"-kind dtypes.
    return dtype.kind == "V" and "float" in dtype.name


def _random_array(spec: InputSpec, shape: tuple, num_samples: int, rng, int_range) -> np.ndarray:
    full = (num_samples, *shape)
    kind = spec.dtype.kind
    if kind == "f" or _is_extended_float(spec.dtype):
        return rng.standard_normal(full).astype(spec.dtype)
    if kind in "iu":
        lo, hi = int_range
        info = np.iinfo(spec.dtype)
        if lo < info.min or hi > info.max:
            raise ConfigError(f"--input-range for {spec.name!r} [{lo}, {hi}] does not fit {spec.dtype}")
        return rng.integers(lo, hi, size=full, endpoint=True).astype(spec.dtype)
    if kind == "b":
        return rng.integers(0, 1, size=full, endpoint=True).astype(bool)
    raise ConfigError(f"cannot generate calibration data for input {spec.name!r} of dtype {spec.dtype}")


def generate_calibration(
    model,
    *,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    input_shapes: Mapping | None = None,
    input_ranges: Mapping | None = None,
    seed: int = 0,
) -> CalibrationSet:
    """Generate seeded random calibration samples from the model's input signature.

    Args:
        model: an onnx ModelProto.
        num_samples: number of samples (>= 1).
        input_shapes: {name: shape} fixing dynamic dimensions (see the module docstring).
        input_ranges: {name: (LO, HI)} for integer inputs, both ends included.
        seed: seed of the numpy Generator.

    Raises:
        ConfigError: a bad shape/range, a name that is not an input, or an unsupported dtype.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"num_samples must be a positive integer, got {num_samples!r}")
    specs = input_specs(model)
    input_shapes = dict(input_shapes or {})
    input_ranges = dict(input_ranges or {})
    _check_known_names("--input-shape", input_shapes, specs)
    _check_known_names("--input-range", input_ranges, specs)
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in specs:
        shape = _resolve_shape(spec, input_shapes.get(spec.name))
        int_range = input_ranges.get(spec.name, DEFAULT_INT_RANGE)
        arrays[spec.name] = _random_array(spec, shape, num_samples, rng, int_range)
    return CalibrationSet(arrays, source=f"generated ({num_samples} samples, seed {seed})")


def _read_npz(path) -> dict:
    try:
        with np.load(os.fspath(path), allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read calibration file {os.fspath(path)!r}: {e}") from e


def _as_samples(spec: InputSpec, array: np.ndarray, origin: str) -> np.ndarray:
    rank = len(spec.shape)
    if array.ndim == rank + 1:
        samples = array
    elif array.ndim == rank and rank > 0:
        samples = array[:, None] if rank == 1 else array.reshape(array.shape[0], 1, *array.shape[1:])
    else:
        raise ConfigError(
            f"{origin}: array {spec.name!r} has shape {array.shape}; the input is "
            f"{_show_shape(spec.shape)}, so expected (samples, ...) with {rank + 1} dims"
        )
    for axis, want in enumerate(spec.shape):
        got = samples.shape[axis + 1]
        if want is not None and want != got:
            raise ConfigError(
                f"{origin}: array {spec.name!r} has sample shape {samples.shape[1:]}, "
                f"the input is {_show_shape(spec.shape)}"
            )
    return _cast_to_input(spec, samples, origin)


def _cast_to_input(spec: InputSpec, array: np.ndarray, origin: str) -> np.ndarray:
    want, got = spec.dtype.kind, array.dtype.kind
    compatible = want == got or (want == "f" and got in "iu") or (want in "iu" and got in "iu")
    if not compatible:
        raise ConfigError(f"{origin}: array {spec.name!r} has dtype {array.dtype}, the input needs {spec.dtype}")
    return np.ascontiguousarray(array, dtype=spec.dtype)


def load_calibration(model, paths: Sequence) -> CalibrationSet:
    """Load calibration samples for ``model`` from one or more ``.npz`` files.

    Every file must hold one array per model input (keyed by input name, samples on axis 0);
    extra arrays are an error, so a misspelt name is not silently ignored.

    Raises:
        ConfigError: unreadable file, missing/unknown input, or mismatched shape/dtype.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ConfigError("no calibration files given")
    specs = input_specs(model)
    names = [s.name for s in specs]
    parts: dict[str, list] = {name: [] for name in names}
    for path in paths:
        origin = f"calibration file {os.fspath(path)!r}"
        data = _read_npz(path)
        missing = [n for n in names if n not in data]
        unknown = sorted(set(data) - set(names))
        if missing or unknown:
            raise ConfigError(
                f"{origin}: missing input(s) {missing}, unknown array(s) {unknown}; "
                f"the model's inputs are {names}"
            )
        arrays = {spec.name: _as_samples(spec, data[spec.name], origin) for spec in specs}
        counts = {n: len(a) for n, a in arrays.items()}
        if len(set(counts.values())) != 1:
            raise ConfigError(f"{origin}: arrays have different sample counts {counts}")
        for name, array in arrays.items():
            parts[name].append(array)
    try:
        arrays = {name: np.concatenate(chunks) for name, chunks in parts.items()}
    except ValueError as e:
        raise ConfigError(f"calibration files disagree on sample shapes: {e}") from e
    return CalibrationSet(arrays, source=", ".join(os.fspath(p) for p in paths))


def resolve_calibration(
    model,
    calibration=None,
    *,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    input_shapes=None,
    input_ranges=None,
    seed: int = 0,
) -> CalibrationSet:
    """Turn any accepted calibration argument into a CalibrationSet for ``model``.

    ``calibration`` may be None (generate), a CalibrationSet, a mapping name -> array
    (samples on axis 0, checked like an .npz file), or one or more .npz paths. Shape and range
    overrides may be given as parsed dicts or as the CLI's ``NAME=...`` strings.
    """
    if isinstance(input_shapes, (list, tuple)):
        input_shapes = parse_input_shapes(input_shapes)
    if isinstance(input_ranges, (list, tuple)):
        input_ranges = parse_input_ranges(input_ranges)
    if calibration is None:
        return generate_calibration(
            model, num_samples=num_samples, input_shapes=input_shapes, input_ranges=input_ranges, seed=seed
        )
    if isinstance(calibration, CalibrationSet):
        return calibration
    if isinstance(calibration, Mapping):
        specs = input_specs(model)
        missing = [s.name for s in specs if s.name not in calibration]
        unknown = sorted(set(calibration) - {s.name for s in specs})
        if missing or unknown:
            raise ConfigError(f"calibration dict: missing input(s) {missing}, unknown array(s) {unknown}")
        arrays = {s.name: _as_samples(s, np.asarray(calibration[s.name]), "calibration dict") for s in specs}
        return CalibrationSet(arrays, source="user arrays")
    return load_calibration(model, calibration)
