"""Options of the optimize pass, each default written once.

``OptimizeConfig`` serves the Python API and the CLI alike: ``dehm_onnx.cli`` builds one
``--flag`` per field from the field's metadata (``help``, and optionally ``choices``, a
callable returning the allowed values, ``metavar``, and ``default_text``, how the help names
a default that is not a plain value). Adding a field here adds the flag. The flags that
``verify`` and ``compare`` share with ``optimize`` (calibration, seed, ...) are built from
the same fields (``add_config_arguments(parser, names)``), so they read and default alike.

Field kinds understood by the flag builder (see ``add_config_arguments``):

- ``bool`` defaulting to ``False``: a ``--flag`` switch;
- ``tuple`` of strings: a repeatable ``--flag VALUE``;
- ``float``/``int``/``str`` (or ``None`` with ``metadata["type"]``): ``--flag VALUE``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import ConfigError

__all__ = [
    "DEFAULT_NUM_SAMPLES",
    "EMIT_ALIASES",
    "EMIT_MODES",
    "PRECISIONS",
    "FUSED_INT_ACTIVATION_ERROR",
    "OptimizeConfig",
    "add_config_arguments",
    "config_from_args",
    "make_config",
]

# How a compressed layer can be written; ``dehm_onnx.graph.emit.EMITTERS`` has one emitter
# per name (a test keeps the two equal). The first runs on every onnxruntime provider.
EMIT_MODES = ("ops", "function", "custom", "auto")
# Storages a compressed layer may use, each allowing the ones before it plus a cheaper one
# (``dehm_onnx.hmatrix.compress``'s ``precision``); ``auto`` allows all of them.
PRECISIONS = ("auto", "float", "fp16", "int8", "int4")
# onnxruntime's MatMulNBits kernel (what DequantizeLinear -> MatMul becomes) quantizes the
# activations to 8 bits at its default accuracy level: 4e-3 to 5.3e-3 relative output error
# whatever the weight (measured, docs/custom_op.md); this allows for a little more. With
# precision "auto", integer arrays are written for that kernel only in layers where
# hypot(certified weight error, this) <= FUSED_INT_MARGIN * tol_out; elsewhere they are
# dequantized when the session is created (exact, float speed).
FUSED_INT_ACTIVATION_ERROR = 6e-3
FUSED_INT_MARGIN = 0.9
# Older names still accepted: ``subgraph`` was the name of ``ops`` (standard ops), and
# "subgraph" otherwise means an If/Loop/Scan body.
EMIT_ALIASES = {"subgraph": "ops"}
# Calibration samples generated when the user gives none (``dehm_onnx.verify.calibration``).
DEFAULT_NUM_SAMPLES = 16


def _emit_choices() -> list[str]:
    return list(EMIT_MODES) + list(EMIT_ALIASES)


@dataclass(frozen=True)
class OptimizeConfig:
    """Every option of ``dehm_onnx.optimize`` (and of ``python -m dehm_onnx optimize``)."""

    tol: float = field(
        default=1e-3,
        metadata={
            "help": "per-layer weight bound, relative Frobenius: ||W - W_H||_F <= tol * ||W||_F, in (0, 1)",
            "metavar": "T",
        },
    )
    emit: str = field(
        default="auto",
        metadata={
            "help": "how a compressed layer is written: 'auto' = the cost model's choice per layer, "
            "'ops' = standard ONNX ops ('subgraph' is an old name for it), 'function' = HMatMul node "
            "with a standard-op function body that stock onnxruntime runs (weights stored once, every "
            "storage), 'custom' = HMatMul node for the compiled kernel",
            "choices": _emit_choices,
        },
    )
    precision: str = field(
        default="auto",
        metadata={
            "help": "storages of the compressed arrays: 'float' = the weight's dtype only, 'fp16', 'int8', "
            "'int4' = each also allows the ones before it (integers on onnxruntime's quantized kernel, "
            "which quantizes activations to 8 bits); 'auto' = all of them, integers on that kernel only "
            "where the output bound tol_out leaves room for its error, and weights of up to 2^20 values "
            "also tried in float16 alone (the smaller standard-op emission is kept); emit 'function' and "
            "'custom' multiply by the exactly dequantized integers instead (float activations)",
            "choices": lambda: list(PRECISIONS),
        },
    )
    min_size: int = field(
        default=64,
        metadata={
            "help": "leave a weight dense when min(rows, cols) is below this",
            "metavar": "N",
        },
    )
    max_ratio: float = field(
        default=1.0,
        metadata={
            "help": "leave a weight dense unless its compressed form takes at most this fraction of "
            "its bytes, in (0, 1]; 1 = any saving, though a small saving can make a layer slower",
            "metavar": "R",
        },
    )
    include: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "only consider layers whose node or weight name matches this glob",
            "metavar": "GLOB",
            "default_text": "every layer",
        },
    )
    exclude: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "never compress layers whose node or weight name matches this glob",
            "metavar": "GLOB",
            "default_text": "none",
        },
    )
    seed: int = field(
        default=0,
        metadata={"help": "seed of the randomized parts of the compression and of generated calibration inputs", "metavar": "S"},
    )
    # Big models (docs/big_models.md).
    jobs: int = field(
        default=0,
        metadata={
            "help": "worker processes compressing layers in parallel, 0 = one per core; "
            "the output is byte-identical for any value",
            "metavar": "N",
        },
    )
    external_data: bool = field(
        default=False,
        metadata={
            "help": "write the output's tensors to OUT.data beside OUT (otherwise only when the "
            "input has external data or the output exceeds protobuf's 2 GB limit)"
        },
    )
    # Verification options (dehm_onnx.verify; definitions in docs/verify.md).
    tol_out: float | None = field(
        default=None,
        metadata={
            "help": "per-layer output bound checked on calibration data: "
            "||X W - X W_H||_F <= tol_out * ||X W||_F, in (0, 1)",
            "metavar": "T",
            "type": float,
            "default_text": "the value of --tol",
        },
    )
    no_verify: bool = field(
        default=False,
        metadata={"help": "skip the output-bound check on calibration data (the report says so)"},
    )
    calibration: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "calibration samples: .npz with arrays keyed by input name, first axis = samples",
            "metavar": "FILE.npz",
            "default_text": "generated from the input signature",
        },
    )
    input_shape: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "shape of a generated calibration input, fixing its dynamic dimensions, e.g. x=1x128",
            "metavar": "NAME=SHAPE",
            "default_text": "the declared shape, dynamic axes as in docs/verify.md",
        },
    )
    input_range: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "range [LO, HI] of a generated integer input",
            "metavar": "NAME=LO:HI",
            "default_text": "as in docs/verify.md",
        },
    )
    num_samples: int = field(
        default=DEFAULT_NUM_SAMPLES,
        metadata={"help": "number of generated calibration samples", "metavar": "N"},
    )
    max_model_error: float | None = field(
        default=None,
        metadata={
            "help": "end-to-end target: choose the largest per-layer tols (a shared tol, then single "
            "layers loosened) whose relative L2 error on every graph output and calibration sample "
            "stays <= this (overrides tol; also the model tolerance of the end-to-end check), in (0, 1)",
            "metavar": "E",
            "type": float,
            "default_text": "off",
        },
    )
    no_model_check: bool = field(
        default=False,
        metadata={
            "help": "skip the end-to-end check (every graph output's per-sample relative L2 error <= "
            "max_model_error, else tol_out, else tol; layers are tightened or left dense until it holds)"
        },
    )
    accept_dense: bool = field(
        default=False,
        metadata={
            "help": "when --max-model-error is reachable only by leaving every layer dense, write that "
            "model and exit 0 (default: exit 1, nothing written)"
        },
    )

    def fuses_integers(self, tol_out: float, rel_certified_error: float) -> bool:
        """Whether a layer's integer arrays are written for onnxruntime's quantized kernel
        (8-bit activations) rather than dequantized at load: always with ``precision`` int8 or
        int4; with ``auto`` when the kernel's activation error leaves the output bound room."""
        if self.precision in ("int8", "int4"):
            return True
        if self.precision != "auto":
            return False
        return math.hypot(rel_certified_error, FUSED_INT_ACTIVATION_ERROR) <= FUSED_INT_MARGIN * tol_out

    @property
    def engine_precision(self) -> str:
        """The storages the engine may use: ``precision`` (every emit mode writes all of them)."""
        return self.precision

    @property
    def layer_tol_out(self) -> float:
        """Each compressed layer's output bound: ``tol_out``, or ``tol`` when none is given.

        The one place this default is decided; the pass writes it into every layer record.
        """
        return float(self.tol_out if self.tol_out is not None else self.tol)

    def __post_init__(self) -> None:
        if self.emit in EMIT_ALIASES:
            object.__setattr__(self, "emit", EMIT_ALIASES[self.emit])
        self.validate()

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first option that is out of range."""
        tol = self.tol
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0.0 < float(tol) < 1.0:
            raise ConfigError(f"tol must be in (0, 1), got {tol!r}")
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, int) or self.min_size < 1:
            raise ConfigError(f"min_size must be an integer >= 1, got {self.min_size!r}")
        ratio = self.max_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
            raise ConfigError(f"max_ratio must be in (0, 1], got {ratio!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        if isinstance(self.jobs, bool) or not isinstance(self.jobs, int) or self.jobs < 0:
            raise ConfigError(f"jobs must be an integer >= 0 (0 = one per core), got {self.jobs!r}")
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(p, str) for p in value):
                raise ConfigError(f"{name} must be a sequence of glob strings, got {value!r}")
        self._validate_verification()
        if self.emit not in EMIT_MODES:
            raise ConfigError(f"emit must be one of {list(EMIT_MODES)}, got {self.emit!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")

    def _validate_verification(self) -> None:
        for name in ("tol_out", "max_model_error"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0
            ):
                raise ConfigError(f"{name} must be in (0, 1), got {value!r}")
        for name in ("calibration", "input_shape", "input_range"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(p, str) for p in value):
                raise ConfigError(f"{name} must be a sequence of strings, got {value!r}")
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ConfigError(f"num_samples must be an integer >= 1, got {self.num_samples!r}")


def make_config(config: OptimizeConfig | None = None, **overrides) -> OptimizeConfig:
    """Return ``config`` (or the defaults) with ``overrides`` applied and validated.

    Raises:
        ConfigError: an override names no option, or a value is out of range.
    """
    base = config if config is not None else OptimizeConfig()
    if not isinstance(base, OptimizeConfig):
        raise ConfigError(f"config must be an OptimizeConfig, got {type(base).__name__}")
    known = {f.name for f in dataclasses.fields(OptimizeConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}; known: {sorted(known)}")
    for f in dataclasses.fields(OptimizeConfig):
        value = overrides.get(f.name)
        if isinstance(f.default, tuple) and isinstance(value, (str, os.PathLike)) and f.name == "calibration":
            overrides[f.name] = (os.fspath(value),)
        elif isinstance(f.default, tuple) and isinstance(value, (list, tuple)):
            overrides[f.name] = tuple(os.fspath(v) if isinstance(v, os.PathLike) else v for v in value)
    return dataclasses.replace(base, **overrides)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _help(f: dataclasses.Field) -> str:
    """The field's help text followed by its default, in words where a value would not read."""
    meta = f.metadata
    text = meta.get("help", "")
    if isinstance(f.default, bool):
        return text  # a switch: off unless given
    shown = meta.get("default_text")
    if shown is None:
        shown = ", ".join(f.default) if isinstance(f.default, tuple) else f.default
    if shown is None or shown == "":
        raise AssertionError(f"Bug: field {f.name!r} needs a default_text for its help")
    repeatable = "repeatable; " if isinstance(f.default, tuple) else ""
    return f"{text} ({repeatable}default: {shown})"


def add_config_arguments(parser: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    """Add one ``--flag`` per ``OptimizeConfig`` field (only ``names``, when given).

    Flags default to "not given" (``config_from_args`` fills in the field defaults); the
    help text shows each default.
    """
    fields = {f.name: f for f in dataclasses.fields(OptimizeConfig)}
    unknown = sorted(set(names or ()) - set(fields))
    if unknown:
        raise AssertionError(f"Bug: no OptimizeConfig field named {unknown}")
    for name in names if names is not None else fields:
        f = fields[name]
        meta = dict(f.metadata)
        kwargs = {"dest": f.name, "default": argparse.SUPPRESS, "help": _help(f)}
        default = f.default
        if isinstance(default, bool):
            kwargs["action"] = "store_true"
        elif isinstance(default, tuple):
            kwargs["action"] = "append"
            kwargs["metavar"] = meta.get("metavar", "VALUE")
        else:
            kwargs["type"] = meta.get("type") or type(default)
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]()
            else:
                kwargs["metavar"] = meta.get("metavar", f.name.upper())
        parser.add_argument(_flag(f.name), **kwargs)


def config_from_args(args: argparse.Namespace) -> OptimizeConfig:
    """Build the config from parsed flags (fields not given keep their defaults)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(OptimizeConfig) if hasattr(args, f.name)}
    return make_config(None, **given)
