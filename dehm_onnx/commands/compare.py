"""``python -m dehm_onnx compare MODEL``: dehm beside SVD, pruning, int8 and int4 on one model.

Prints the Markdown table; ``--json`` writes ``{"rows": [...]}``, ``--report`` the Markdown,
``--plot`` a PNG of error against size (needs matplotlib). Exit 0, or 2 on bad input; a
method that fails is a row with its error noted, not a failure of the command.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import add_config_arguments, config_from_args
from .verify import CALIBRATION_OPTIONS

__all__ = ["register", "run"]


def _methods():
    from ..compare.core import METHODS

    return METHODS


def register(subparsers) -> None:
    """Add the ``compare`` parser."""
    from ..compare.core import DEFAULT_ROUNDS, DEFAULT_TOLS

    parser = subparsers.add_parser(
        "compare",
        help="measure dehm against truncated SVD, pruning, int8 and int4 on one model",
        description=(
            "Compress MODEL's constant MatMul/Gemm weights by dehm, global truncated SVD and "
            "magnitude pruning (each at every --tol, ||W - W~||_F <= tol ||W||_F), by onnxruntime "
            "int8 dynamic quantization and int4 MatMulNBits, and measure size, end-to-end and "
            "per-layer error on one calibration set, and CPU latency."
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
        choices=_methods(),
        help="run only these methods (repeatable; default: all)",
    )
    # Shared with optimize and verify: one definition, the OptimizeConfig fields.
    add_config_arguments(parser, CALIBRATION_OPTIONS + ("min_size", "emit"))
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, metavar="N", help=f"timed latency rounds (default: {DEFAULT_ROUNDS})")
    parser.add_argument("--json", metavar="FILE.json", help='write {"rows": [...]}')
    parser.add_argument("--report", metavar="FILE.md", help="write the Markdown table")
    parser.add_argument("--plot", metavar="FILE.png", help="write error-vs-size plots (needs matplotlib)")
    parser.add_argument("--keep-models", metavar="DIR", help="keep every method's model in DIR (created if missing)")
    parser.set_defaults(func=run)


def _check_paths(args, tols, methods, config) -> None:
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
            writes += [PathRole("a model file of --keep-models", folder / name) for name in workdir_files(tols, methods)]
    check_paths(reads, writes)


def run(args: argparse.Namespace) -> int:
    """Run the comparison, print the table and write the requested files; 0 on success."""
    from ..compare import DEFAULT_TOLS, compare, markdown_table, write_json, write_markdown, write_plot

    config = config_from_args(args)
    tols, methods = args.tols or DEFAULT_TOLS, args.method or _methods()
    if args.plot:
        _require_matplotlib()  # fail before the (long) comparison, not after
    _check_paths(args, tols, methods, config)
    result = compare(
        args.model,
        tols=tols,
        methods=methods,
        calibration=list(config.calibration) or None,
        input_shapes=list(config.input_shape) or None,
        input_ranges=list(config.input_range) or None,
        num_samples=config.num_samples,
        seed=config.seed,
        config=config,
        rounds=args.rounds,
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
