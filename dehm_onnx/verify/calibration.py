"""Calibration inputs: the samples on which layer and model errors are measured.

A calibration set maps every graph input name to an array whose first axis indexes samples;
sample ``i`` feeds ``arrays[name][i]`` to the model. Two sources:

* generated from the model's input signature (``generate_calibration``), seeded, each input
  by the first rule that applies (``CalibrationSet.how`` records which, per input):

  1. an integer input with ``--input-range name=LO:HI``: uniform in ``[LO, HI]``;
  2. a name containing ``mask`` (any dtype): all ones;
  3. an integer input of rank <= 1 whose name ends in ``len``/``lens``/``length(s)``: the
     length of the generated sequences (the longest non-batch axis of the float inputs);
  4. an integer input that reaches a ``Gather`` as its indices (through Cast, Reshape,
     Unsqueeze, ... only): uniform over the rows of that table, ``[0, rows - 1]``;
  5. other integers: uniform in ``DEFAULT_INT_RANGE``; floats: standard normal; booleans:
     fair coin flips.

  Dynamic dimensions take their size from ``--input-shape name=1x128``; otherwise the
  original model is run on one generated sample per candidate: every dynamic axis at 1, then
  batch axes (axis 0 and axes sharing its symbolic name) at 1 and the other dynamic axes at
  each of ``DYNAMIC_SIZES`` in increasing order, then those sizes on one input at a time.
  From the first candidate that runs, larger sizes are tried as long as the model keeps
  running, and the largest that ran is used (so a sequence axis gets a useful length, not the
  shortest the model accepts); ``CalibrationSet.notes`` says which. If none runs,
  ``ConfigError`` names the input and axis. Only batch axes dynamic: 1, nothing run. Before anything is allocated, an empty set (a zero-size axis) or one larger
  than ``GENERATED_BYTES_LIMIT`` is refused, naming the input and the option to change.
* loaded from the user's ``.npz`` files (``load_calibration``): arrays keyed by input name,
  first axis = samples. An array with one axis more than the input is split along that axis;
  an array with the input's own rank is split along its first axis, each sample keeping it
  with size 1 (so ``(100, 128)`` for an input ``[batch, 128]`` is 100 samples of ``(1, 128)``).
  Several files are concatenated along the sample axis.

``held_out_count`` says how many of the last samples are held out: the optimizer tightens
layers on the others and only reports the held-out ones (``docs/verify.md``).
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
    "DEFAULT_INT_RANGE",
    "DEFAULT_NUM_SAMPLES",
    "DYNAMIC_SIZES",
    "GENERATED_BYTES_LIMIT",
    "CalibrationSet",
    "InputSpec",
    "check_calibration_size",
    "gather_table_rows",
    "generate_calibration",
    "held_out_count",
    "input_specs",
    "load_calibration",
    "parse_input_ranges",
    "parse_input_shapes",
    "resolve_calibration",
]

DEFAULT_INT_RANGE = (0, 9)
# Sizes tried for dynamic non-batch axes when 1 does not run (audio front ends need a
# minimum length for their Pad/STFT).
DYNAMIC_SIZES = (16, 64, 256, 1024, 4096, 16384)
# Generated calibration arrays, all inputs and samples together, may take at most this.
GENERATED_BYTES_LIMIT = 2 << 30

_SHAPE_RE = re.compile(r"^\s*([^=]+?)\s*=\s*(\d+(?:\s*[x,]\s*\d+)*)?\s*$")
_RANGE_RE = re.compile(r"^\s*([^=]+?)\s*=\s*(-?\d+)\s*:\s*(-?\d+)\s*$")


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A graph input as calibration sees it: name, numpy dtype and shape (None = dynamic)."""

    name: str
    dtype: np.dtype
    shape: tuple  # ints, or None for a dynamic dimension
    dim_names: tuple = ()  # the declared symbolic name of each axis, or None


@dataclasses.dataclass
class CalibrationSet:
    """Calibration samples: ``arrays[name][i]`` is input ``name`` of sample ``i``.

    Attributes:
        arrays: input name -> array with samples on axis 0 (all the same number of samples).
        source: a short description ("generated, seed 0" or the file names) for reports.
        how: input name -> how its values were made (generated inputs).
        generated: True when the samples were generated rather than given by the user.
        notes: sentences for the report (e.g. which sizes the dynamic axes got).
    """

    arrays: dict
    source: str = ""
    how: dict = dataclasses.field(default_factory=dict)
    generated: bool = False
    notes: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        counts = {name: len(a) for name, a in self.arrays.items()}
        if not counts:
            raise ConfigError("calibration set has no inputs")
        if len(set(counts.values())) != 1:
            raise ConfigError(f"calibration inputs have different sample counts: {counts}")
        if next(iter(counts.values())) == 0:
            raise ConfigError("calibration set has no samples: there would be nothing to check")
        for name, a in self.arrays.items():
            if np.ndim(a) > 1 and 0 in np.shape(a)[1:]:
                raise ConfigError(
                    f"calibration input {name!r} has sample shape {tuple(np.shape(a)[1:])} with a zero-size axis: "
                    "there would be nothing to check"
                )

    @property
    def num_samples(self) -> int:
        """Number of samples (the common length of every array's first axis)."""
        return len(next(iter(self.arrays.values())))

    def samples(self) -> Iterator[dict]:
        """Yield one feed dict (input name -> array) per sample."""
        for i in range(self.num_samples):
            yield {name: np.asarray(a[i]) for name, a in self.arrays.items()}

    def subset(self, indices) -> "CalibrationSet":
        """The samples at ``indices`` (same source, rules and notes)."""
        indices = list(indices)
        return dataclasses.replace(self, arrays={n: a[indices] for n, a in self.arrays.items()})


def held_out_count(num_samples: int) -> int:
    """How many of the last samples are held out from tightening: a quarter, none below 4."""
    return num_samples // 4 if num_samples >= 4 else 0


def _numpy_dtype(elem_type: int) -> np.dtype:
    from onnx import helper

    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


def input_specs(model) -> list[InputSpec]:
    """The true inputs of ``model`` (graph inputs that are not initializers), as InputSpecs.

    Raises:
        ConfigError: an input is not a tensor, or declares a negative dimension.
    """
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if not value.type.HasField("tensor_type"):
            raise ConfigError(f"input {value.name!r} is not a tensor; calibration needs tensors")
        tensor_type = value.type.tensor_type
        dims, names = [], []
        for axis, d in enumerate(tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value < 0:
                raise ConfigError(
                    f"input {value.name!r} declares a negative dimension {d.dim_value} at axis {axis}; "
                    f"give its shape with --input-shape {value.name}=D1xD2..."
                )
            dims.append(d.dim_value if d.HasField("dim_value") else None)
            names.append(d.dim_param if d.HasField("dim_param") and d.dim_param else None)
        specs.append(InputSpec(value.name, _numpy_dtype(tensor_type.elem_type), tuple(dims), tuple(names)))
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


def _check_override(spec: InputSpec, override: tuple) -> tuple:
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


# ---- how each input's values are generated ------------------------------------------------

def gather_table_rows(model) -> dict:
    """{input name: rows} for integer inputs that reach a ``Gather`` as its indices.

    The indices are followed from the graph input through ops that keep their values
    (Cast, Identity, Reshape, Unsqueeze, Squeeze, Flatten, Expand, Transpose, Slice) to a
    ``Gather`` whose data is a constant; ``rows`` is the size of that table along the gather
    axis (the smallest one when an input indexes several tables). Main graph only.
    """
    graph = model.graph
    dims = {t.name: tuple(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            dims[node.output[0]] = tuple(node.attribute[0].t.dims)
    consumers: dict = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, index))
    rows = {}
    for value in graph.input:
        seen, stack = set(), [value.name]
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            for node, index in consumers.get(name, ()):
                if node.op_type == "Gather" and index == 1 and node.input[0] in dims:
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    table = dims[node.input[0]]
                    if table and -len(table) <= axis < len(table):
                        size = int(table[axis])
                        rows[value.name] = min(size, rows.get(value.name, size))
                elif node.op_type in _VALUE_KEEPING and index == 0:
                    stack.extend(o for o in node.output if o)
    return rows


_VALUE_KEEPING = {"Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Expand", "Transpose", "Slice"}
_MASK_NAME = re.compile(r"mask", re.IGNORECASE)
_LENGTH_NAME = re.compile(r"(^|[_.\-/])(len|lens|length|lengths)$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class _Rule:
    """How the values of one generated input are drawn: ``kind`` and its sentence."""

    kind: str  # "normal" | "coin" | "ones" | "length" | "uniform"
    text: str
    low: int = 0
    high: int = 0


def _value_rule(spec: InputSpec, user_range, table_rows) -> _Rule:
    kind = spec.dtype.kind
    is_float = kind == "f" or _is_extended_float(spec.dtype)
    if kind in "iu" and user_range is not None:
        lo, hi = user_range
        return _Rule("uniform", f"integers uniform in [{lo}, {hi}] (--input-range)", lo, hi)
    if _MASK_NAME.search(spec.name) and (is_float or kind in "iub"):
        return _Rule("ones", "all ones (the name says it is a mask)")
    if kind in "iu" and len(spec.shape) <= 1 and _LENGTH_NAME.search(spec.name):
        return _Rule("length", "the length of the generated sequences (the name says it holds lengths)")
    if kind in "iu" and table_rows is not None:
        hi = max(int(table_rows) - 1, 0)
        return _Rule("uniform", f"integers uniform in [0, {hi}] (indices into a {table_rows}-row Gather table)", 0, hi)
    if kind in "iu":
        lo, hi = DEFAULT_INT_RANGE
        return _Rule("uniform", f"integers uniform in [{lo}, {hi}] (default; set with --input-range)", lo, hi)
    if is_float:
        return _Rule("normal", "standard normal N(0, 1)")
    if kind == "b":
        return _Rule("coin", "fair coin flips")
    raise ConfigError(f"cannot generate calibration data for input {spec.name!r} of dtype {spec.dtype}")


def _sequence_length(specs: Sequence[InputSpec], shapes: dict) -> int | None:
    """The longest non-batch axis of the float inputs (what a lengths input counts)."""
    sizes = [
        size
        for spec in specs
        if spec.dtype.kind == "f" or _is_extended_float(spec.dtype)
        for size in shapes[spec.name][1:]
    ]
    return max(sizes) if sizes else None


def _values(spec: InputSpec, rule: _Rule, shape: tuple, num_samples: int, rng, length) -> np.ndarray:
    full = (num_samples, *shape)
    if rule.kind == "normal":
        return rng.standard_normal(full).astype(spec.dtype)
    if rule.kind == "coin":
        return rng.integers(0, 1, size=full, endpoint=True).astype(bool)
    if rule.kind == "ones":
        return np.ones(full, dtype=spec.dtype)
    if rule.kind == "length" and length is not None:
        return np.full(full, length, dtype=spec.dtype)
    lo, hi = (rule.low, rule.high) if rule.kind == "uniform" else DEFAULT_INT_RANGE
    info = np.iinfo(spec.dtype)
    if lo < info.min or hi > info.max:
        raise ConfigError(f"--input-range for {spec.name!r} [{lo}, {hi}] does not fit {spec.dtype}")
    return rng.integers(lo, hi, size=full, endpoint=True).astype(spec.dtype)


# ---- shapes: dynamic axes and the size check ------------------------------------------

def _batch_names(specs: Sequence[InputSpec]) -> set:
    return {s.dim_names[0] for s in specs if s.dim_names and s.dim_names[0]}


def _is_batch_axis(spec: InputSpec, axis: int, batch_names: set) -> bool:
    name = spec.dim_names[axis] if axis < len(spec.dim_names) else None
    return axis == 0 or (name is not None and name in batch_names)


def _dynamic_axes(specs, overrides) -> list:
    """(input, axis) of every dynamic axis that ``--input-shape`` leaves open."""
    return [(s, axis) for s in specs if s.name not in overrides for axis, d in enumerate(s.shape) if d is None]


def _shape_candidates(specs: Sequence[InputSpec], overrides: dict) -> list:
    """Assignments of sizes to the open dynamic axes, in the order they are tried.

    Each is ``(family, label, size_of)`` with ``size_of(spec, axis)`` giving the size of a
    dynamic axis: first every one at 1; then, for each of ``DYNAMIC_SIZES``, batch axes (axis
    0, and axes sharing the symbolic name of an axis 0) at 1 and all other open axes at that
    size (these form one family, in increasing size); then one family per input: that size on
    its non-batch axes only, the others at 1.
    """
    batch = _batch_names(specs)
    open_axes = _dynamic_axes(specs, overrides)
    non_batch = [(s, a) for s, a in open_axes if not _is_batch_axis(s, a, batch)]
    candidates = [("all", "every dynamic axis at 1", lambda spec, axis: 1)]
    if not non_batch:
        return candidates
    for size in DYNAMIC_SIZES:
        candidates.append((
            "all",
            f"batch axes at 1, other dynamic axes at {size}",
            lambda spec, axis, size=size: 1 if _is_batch_axis(spec, axis, batch) else size,
        ))
    owners = list(dict.fromkeys(s.name for s, _ in non_batch))
    if len(owners) > 1:
        for owner in owners:
            names = {s.dim_names[a] for s, a in non_batch if s.name == owner and s.dim_names[a]}
            for size in DYNAMIC_SIZES:
                def size_of(spec, axis, owner=owner, names=names, size=size):
                    if _is_batch_axis(spec, axis, batch):
                        return 1
                    mine = spec.name == owner or (spec.dim_names[axis] is not None and spec.dim_names[axis] in names)
                    return size if mine else 1
                candidates.append((owner, f"dynamic non-batch axes of {owner!r} at {size}, others at 1", size_of))
    return candidates


def _shapes(specs: Sequence[InputSpec], overrides: dict, size_of) -> dict:
    shapes = {}
    for spec in specs:
        if spec.name in overrides:
            shapes[spec.name] = overrides[spec.name]
        else:
            shapes[spec.name] = tuple(d if d is not None else size_of(spec, axis) for axis, d in enumerate(spec.shape))
    return shapes


def _nbytes(spec: InputSpec, shape: tuple, num_samples: int) -> int:
    count = num_samples
    for d in shape:
        count *= int(d)
    return count * spec.dtype.itemsize


def check_calibration_size(specs: Sequence[InputSpec], shapes: dict, num_samples: int) -> None:
    """Refuse, before allocating, generated calibration that is empty or too large.

    Raises:
        ConfigError: an input has a zero-size axis, or all inputs together would take more
            than ``GENERATED_BYTES_LIMIT`` bytes (the message names the largest input).
    """
    for spec in specs:
        if any(int(d) == 0 for d in shapes[spec.name]):
            raise ConfigError(
                f"calibration input {spec.name!r} has shape {tuple(shapes[spec.name])} with a zero-size axis: "
                f"there would be nothing to check; give a non-empty shape with --input-shape {spec.name}=D1xD2..."
            )
    sizes = {spec.name: _nbytes(spec, shapes[spec.name], num_samples) for spec in specs}
    if sum(sizes.values()) > GENERATED_BYTES_LIMIT:
        name = max(sizes, key=sizes.get)
        spec = next(s for s in specs if s.name == name)
        raise ConfigError(
            f"generated calibration input {name!r} would take {sizes[name] / 2**30:.3g} GiB "
            f"({num_samples} samples of shape {tuple(shapes[name])}, {spec.dtype}), more than the "
            f"{GENERATED_BYTES_LIMIT / 2**30:g} GiB limit; lower --num-samples or set a smaller shape "
            f"with --input-shape {name}=D1xD2..."
        )


def _describe_shapes(specs, overrides, shapes) -> list:
    lines = []
    for spec in specs:
        if spec.name in overrides:
            lines.append(f"{spec.name}: shape {tuple(shapes[spec.name])} (--input-shape)")
        elif any(d is None for d in spec.shape):
            lines.append(f"{spec.name}: shape {tuple(shapes[spec.name])} from declared {_show_shape(spec.shape)}")
    return lines


def _probe_shapes(model, specs, overrides, rules, rng_seed, tried: list):
    """Shapes for the open dynamic axes: the largest size of the first family the model runs.

    Candidates are tried in order (``_shape_candidates``); once one runs, the larger sizes of
    its family are tried too, and the last that runs before one fails (or the family ends) is
    used: a sequence axis then gets a useful length, not just the shortest the model accepts.
    """
    from .runner import make_cpu_session

    candidates = _shape_candidates(specs, overrides)
    open_axes = _dynamic_axes(specs, overrides)
    batch = _batch_names(specs)
    if all(_is_batch_axis(s, a, batch) for s, a in open_axes):
        _, label, size_of = candidates[0]
        return _shapes(specs, overrides, size_of), label
    session = make_cpu_session(model, quiet=True)
    first_error, found = None, None
    for index, (family, label, size_of) in enumerate(candidates):
        if found is not None and family != found[0]:
            break
        shapes = _shapes(specs, overrides, size_of)
        try:
            check_calibration_size(specs, shapes, 1)
        except ConfigError:
            if index == 0:
                raise  # with every dynamic axis at 1, the declared or given shape is at fault
            if found is not None:
                break
            continue
        feed = _draw(specs, shapes, rules, 1, np.random.default_rng(rng_seed))
        try:
            session.run(None, {name: np.asarray(a[0]) for name, a in feed.items()})
        except Exception as e:  # noqa: BLE001 - onnxruntime raises several types
            if found is not None:
                break
            first_error = first_error or str(e).splitlines()[0]
            tried.append(label)
            continue
        found = (family, shapes, label)
    if found is not None:
        return found[1], found[2]
    spec, axis = next(((s, a) for s, a in open_axes if not _is_batch_axis(s, a, batch)), open_axes[0])
    example = "x".join(
        str(d) if d is not None else ("1" if _is_batch_axis(spec, i, batch) else "N") for i, d in enumerate(spec.shape)
    )
    raise ConfigError(
        f"input {spec.name!r} axis {axis} is dynamic and no size tried (1, {', '.join(map(str, DYNAMIC_SIZES))}) "
        f"runs the model (first failure: {_short(first_error)}); give the shape with "
        f"--input-shape {spec.name}={example} (N = a size the model accepts)"
    )


def _short(text: str | None, limit: int = 160) -> str:
    text = (text or "").strip()
    text = text.split("Status Message: ")[-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _draw(specs, shapes, rules, num_samples: int, rng) -> dict:
    length = _sequence_length(specs, shapes)
    return {s.name: _values(s, rules[s.name], shapes[s.name], num_samples, rng, length) for s in specs}


def generate_calibration(
    model,
    *,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    input_shapes: Mapping | None = None,
    input_ranges: Mapping | None = None,
    seed: int = 0,
    probe: bool = True,
) -> CalibrationSet:
    """Generate seeded calibration samples from the model's input signature.

    How each input's values and dynamic axes are chosen is described in the module
    docstring; ``CalibrationSet.how`` says it per input.

    Args:
        model: an onnx ModelProto.
        num_samples: number of samples (>= 1).
        input_shapes: {name: shape} fixing dynamic dimensions (see the module docstring).
        input_ranges: {name: (LO, HI)} for integer inputs, both ends included.
        seed: seed of the numpy Generator.
        probe: run the model on one sample to find sizes of dynamic non-batch axes that it
            accepts (False: every dynamic axis at 1, nothing run).

    Raises:
        ConfigError: a bad shape/range, a name that is not an input, an unsupported dtype,
            an empty or too large calibration set, or dynamic axes no tried size fits.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"num_samples must be a positive integer, got {num_samples!r}")
    specs = input_specs(model)
    input_shapes = dict(input_shapes or {})
    input_ranges = dict(input_ranges or {})
    _check_known_names("--input-shape", input_shapes, specs)
    _check_known_names("--input-range", input_ranges, specs)
    overrides = {s.name: _check_override(s, input_shapes[s.name]) for s in specs if s.name in input_shapes}
    table_rows = gather_table_rows(model)
    rules = {s.name: _value_rule(s, input_ranges.get(s.name), table_rows.get(s.name)) for s in specs}
    tried: list = []
    if probe and _dynamic_axes(specs, overrides):
        shapes, label = _probe_shapes(model, specs, overrides, rules, seed, tried)
    else:
        label = "every dynamic axis at 1 (not probed)" if _dynamic_axes(specs, overrides) else ""
        shapes = _shapes(specs, overrides, lambda spec, axis: 1)
    check_calibration_size(specs, shapes, num_samples)
    arrays = _draw(specs, shapes, rules, num_samples, np.random.default_rng(seed))
    length = _sequence_length(specs, shapes)
    how = {}
    for spec in specs:
        text = rules[spec.name].text
        if rules[spec.name].kind == "length":
            text = f"{length} ({text})" if length is not None else "integers uniform in [0, 9]"
        how[spec.name] = f"{text}; shape {tuple(shapes[spec.name])}"
    notes = []
    if label:
        rejected = f"; {len(tried)} smaller assignment(s) rejected" if tried else ""
        notes.append(f"dynamic axes: {label} (the largest size tried that the model runs{rejected}); "
                     "set them with --input-shape NAME=D1xD2...")
    return CalibrationSet(arrays, source=f"generated ({num_samples} samples, seed {seed})", how=how,
                          generated=True, notes=notes)


def _read_npz(path) -> dict:
    where = os.fspath(path)
    try:
        loaded = np.load(where, allow_pickle=False)
    except FileNotFoundError as e:
        raise ConfigError(f"cannot read calibration file {where!r}: it does not exist") from e
    except (OSError, ValueError, EOFError) as e:
        raise ConfigError(f"cannot read calibration file {where!r}: not an .npz file") from e
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ConfigError(f"cannot read calibration file {where!r}: not an .npz file (a single .npy array)")
    try:
        with loaded as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, KeyError) as e:
        raise ConfigError(f"cannot read calibration file {where!r}: not an .npz file ({type(e).__name__})") from e


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
