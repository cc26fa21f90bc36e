"""``python -m dehm_onnx compare MODEL``: dehm beside SVD, pruning, int8 and int4 on one model.

Prints the Markdown table; ``--json`` writes ``{"rows": [...]}``, ``--report`` the Markdown,
``--plot`` a PNG of error against size (needs matplotlib). Exit 0, or 2 on bad input; a
method that fails is a row with its error noted, not a failure of the command.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .verify import add_calibration_arguments

__all__ = ["register", "run"]


def _methods():
    from ..compare.core import METHODS

    return METHODS


def _emit_modes():
    from ..config import EMIT_ALIASES, EMIT_MODES

    return list(EMIT_MODES) + list(EMIT_ALIASES)


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
    add_calibration_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of generated calibration inputs and of compression")
    parser.add_argument("--min-size", type=int, default=None, metavar="N", help="leave weights with min(rows, cols) < N dense (optimize's default otherwise)")
    parser.add_argument("--emit", choices=_emit_modes(), default=None, help="how dehm writes its H-matrices (optimize's default otherwise)")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, metavar="N", help=f"timed latency rounds (default: {DEFAULT_ROUNDS})")
    parser.add_argument("--json", metavar="FILE.json", help='write {"rows": [...]}')
    parser.add_argument("--report", metavar="FILE.md", help="write the Markdown table")
    parser.add_argument("--plot", metavar="FILE.png", help="write error-vs-size plots (needs matplotlib)")
    parser.add_argument("--keep-models", metavar="DIR", help="keep every method's model in DIR")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the comparison, print the table and write the requested files; 0 on success."""
    from ..compare import DEFAULT_TOLS, compare, markdown_table, write_json, write_markdown, write_plot
    from ..config import make_config

    if args.plot:
        _require_matplotlib()  # fail before the (long) comparison, not after
    overrides = {"seed": args.seed}
    if args.min_size is not None:
        overrides["min_size"] = args.min_size
    if args.emit is not None:
        overrides["emit"] = args.emit
    result = compare(
        args.model,
        tols=args.tol or DEFAULT_TOLS,
        methods=args.method or _methods(),
        calibration=args.calibration,
        input_shapes=args.input_shape,
        input_ranges=args.input_range,
        num_samples=args.num_samples,
        seed=args.seed,
        config=make_config(None, **overrides),
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
