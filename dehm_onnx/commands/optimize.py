"""``python -m dehm_onnx optimize IN OUT``: compress a model's weights, print the report."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

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
    parser.add_argument("output", metavar="OUT", help="output .onnx path (must differ from IN)")
    add_config_arguments(parser)
    parser.add_argument("--report", metavar="FILE.json", help="also write the report as JSON")
    parser.add_argument("-q", "--quiet", action="store_true", help="do not print the report table or the progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Optimize ``args.input`` into ``args.output``; 0 on success."""
    from ..api import optimize_file  # imports onnx: only when run
    from ..progress import ProgressBar

    config = config_from_args(args)
    output = Path(args.output)
    _refuse_same(Path(args.input), output)
    if args.report and not Path(args.report).resolve().parent.is_dir():
        from ..errors import ConfigError

        raise ConfigError(f"folder of --report {args.report!r} does not exist")
    # The bar draws only on a terminal; --quiet turns it off as well as the table.
    progress = ProgressBar(enabled=False if args.quiet else None)
    try:
        report = optimize_file(args.input, output, config, progress=progress)
    finally:
        progress.close()
    if args.report:
        _write_text(Path(args.report), report.to_json() + "\n")
    if not args.quiet:
        print(report.to_table())
        print(f"wrote {output}")
    return 0


def _refuse_same(source: Path, target: Path) -> None:
    # Checked before the (possibly long) optimization, and again when saving.
    from ..api import same_file
    from ..errors import ConfigError

    if same_file(target, source):
        raise ConfigError(f"output {str(target)!r} is the input model; choose another output path")


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it and a rename."""
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
