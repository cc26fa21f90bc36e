"""``python -m dehm_onnx compare MODEL``: dehm beside SVD, pruning and onnxruntime's quantizers.

Prints the Markdown table; ``--json`` writes the rows (each with its ``pareto`` flag), the
per-output errors and the kernels stock onnxruntime runs; ``--report`` the Markdown,
``--plot`` a PNG Pareto plot of error against file bytes (needs matplotlib). Exit 0, or 2 on
bad input; a method that fails is a row with its error noted, not a failure of the command.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import EMIT_ALIASES, EMIT_MODES, add_config_arguments, config_from_args
from .verify import CALIBRATION_OPTIONS

__all__ = ["register", "run"]


def _methods():
    from ..compare.core import METHODS

    return METHODS


def _method_choices():
    from ..compare.methods import METHOD_ALIASES

    return list(_methods()) + list(METHOD_ALIASES)


def register(subparsers) -> None:
    """Add the ``compare`` parser."""
    from ..compare.core import DEFAULT_ROUNDS, DEFAULT_TOLS
    from ..compare.methods import ACCURACY_LEVELS

    parser = subparsers.add_parser(
        "compare",
        help="measure dehm against truncated SVD, pruning and onnxruntime's quantizers on one model",
        description=(
            "Compress MODEL's constant MatMul/Gemm weights by dehm, global truncated SVD and "
            "magnitude pruning (each at every --tol, ||W - W~||_F <= tol ||W||_F), by onnxruntime "
            "int8 dynamic quantization and 4- and 8-bit weight-only MatMulNBits, and measure file "
            "bytes, end-to-end and per-layer error on one calibration set, and CPU latency; mark "
            "the rows no other row beats on both file bytes and output error (Pareto)."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="the .onnx model (never modified)")
    parser.add_argument(
        "--tol",
        dest="tols",  # not OptimizeConfig.tol: one row per value
        action="append",
        type=float,
        metavar="T",
        help=f"weight bound of dehm, svd and pruning, in (0, 1) (repeatable; default: {', '.join(map(str, DEFAULT_TOLS))})",
    )
    parser.add_argument(
        "--method",
        action="append",
        choices=_method_choices(),
        help="run only these methods (repeatable; default: all; int4 is an old name of nbits4)",
    )
    parser.add_argument(
        "--precision",
        dest="precisions",  # not OptimizeConfig.precision: one set of dehm rows per value
        action="append",
        metavar="P",
        help="dehm rows at this optimize --precision (repeatable; default: optimize's own; "
        "needs an optimize with --precision)",
    )
    parser.add_argument(
        "--emit",
        dest="emits",  # not OptimizeConfig.emit: one set of dehm rows per value
        action="append",
        choices=list(EMIT_MODES) + list(EMIT_ALIASES),
        help="dehm rows in this emission mode (repeatable; default: optimize's default emit)",
    )
    parser.add_argument(
        "--accuracy-level",
        dest="accuracy_levels",
        action="append",
        type=int,
        choices=ACCURACY_LEVELS,
        help="MatMulNBits rows (nbits4, nbits8) at this accuracy_level (repeatable; default: "
        "the quantizer's, attribute unset = level 0, float32 arithmetic)",
    )
    # Shared with optimize and verify: one definition, the OptimizeConfig fields.
    add_config_arguments(parser, CALIBRATION_OPTIONS + ("min_size",))
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, metavar="N", help=f"timed latency rounds (default: {DEFAULT_ROUNDS})")
    parser.add_argument(
        "--stock-latency",
        action="store_true",
        help="time --emit function models on their standard-op function bodies, as stock onnxruntime "
        "runs them (default: with the compiled HMatMul kernel)",
    )
    parser.add_argument("--json", metavar="FILE.json", help="write the rows (with their pareto flags), per-output errors and stock kernels as JSON")
    parser.add_argument("--report", metavar="FILE.md", help="write the Markdown table")
    parser.add_argument("--plot", metavar="FILE.png", help="write a Pareto plot, output error against file bytes and latency (needs matplotlib)")
    parser.add_argument("--keep-models", metavar="DIR", help="keep every method's model in DIR (created if missing)")
    parser.set_defaults(func=run)


def _check_paths(args, tols, methods, config, variants: dict) -> None:
    """Refuse clashing or unwritable output paths before the (long) comparison."""
    from ..api import model_files
    from ..compare.core import workdir_files
    from ..errors import ConfigError
    from ..files import PathRole, check_paths

    reads = model_files(args.model, "MODEL") + [PathRole("--calibration", c) for c in config.calibration]
    writes = [PathRole(flag, getattr(args, flag[2:])) for flag in ("--json", "--report", "--plot") if getattr(args, flag[2:])]
    if args.keep_models:
        folder = Path(args.keep_models)
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"--keep-models {args.keep_models!r} is not a folder")
        if folder.is_dir():  # a folder compare creates holds nothing to clash with
            writes += [PathRole("a model file of --keep-models", folder / name) for name in workdir_files(tols, methods, **variants)]
    check_paths(reads, writes)


def run(args: argparse.Namespace) -> int:
    """Run the comparison, print the table and write the requested files; 0 on success."""
    from ..compare import DEFAULT_TOLS, compare, markdown_table, write_json, write_markdown, write_plot

    from ..compare.core import plan_rows

    config = config_from_args(args)
    tols, methods = args.tols or DEFAULT_TOLS, args.method or _methods()
    variants = {"precisions": args.precisions, "emits": args.emits, "accuracy_levels": args.accuracy_levels}
    plan_rows(tols, methods, **variants)  # refuse bad options before any work
    if args.plot:
        _require_matplotlib()  # fail before the (long) comparison, not after
    _check_paths(args, tols, methods, config, variants)
    result = compare(
        args.model,
        tols=tols,
        methods=methods,
        **variants,
        calibration=list(config.calibration) or None,
        input_shapes=list(config.input_shape) or None,
        input_ranges=list(config.input_range) or None,
        num_samples=config.num_samples,
        seed=config.seed,
        config=config,
        rounds=args.rounds,
        stock_latency=args.stock_latency,
        workdir=args.keep_models,
    )
    print(markdown_table(result))
    if args.json:
        write_json(result, args.json)
    if args.report:
        write_markdown(result, args.report, title=f"dehm_onnx compare: {Path(args.model).name}")
    if args.plot:
        write_plot(result, args.plot, title=Path(args.model).name)
    return 0


def _require_matplotlib() -> None:
    from ..errors import ConfigError

    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ConfigError("--plot needs matplotlib: pip install matplotlib") from e
