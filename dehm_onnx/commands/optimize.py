"""``python -m dehm_onnx optimize IN OUT``: compress a model's weights, print the report."""

from __future__ import annotations

import argparse

from ..config import add_config_arguments, config_from_args

__all__ = ["register", "run"]


def register(subparsers) -> None:
    """Add the ``optimize`` parser; its option flags come from ``OptimizeConfig``."""
    parser = subparsers.add_parser(
        "optimize",
        help="compress constant MatMul/Gemm weights into error-bounded H-matrices",
        description=(
            "Replace every eligible constant MatMul/Gemm weight W of IN by an H-matrix W_H with "
            "||W - W_H||_F <= tol * ||W||_F, write OUT atomically and print the per-layer report."
        ),
    )
    parser.add_argument("input", metavar="IN", help="input .onnx model (never modified)")
    parser.add_argument("output", metavar="OUT", help="output .onnx path (must differ from IN; OUT.data beside it is reserved)")
    add_config_arguments(parser)
    parser.add_argument("--report", metavar="FILE.json", help="also write the report as JSON")
    parser.add_argument("-q", "--quiet", action="store_true", help="do not print the report table or the progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Optimize ``args.input`` into ``args.output``; 0 on success."""
    from ..api import optimize_file  # imports onnx: only when run
    from ..progress import ProgressBar

    config = config_from_args(args)
    # The bar draws only on a terminal; --quiet turns it off as well as the table.
    progress = ProgressBar(enabled=False if args.quiet else None)
    try:
        # Refuses clashing or unwritable output paths before any work (dehm_onnx.files).
        report = optimize_file(args.input, args.output, config, progress=progress, report_path=args.report)
    finally:
        progress.close()
    if not args.quiet:
        print(report.to_table())
        print(f"wrote {args.output}")
    return 0
