"""Command line: ``python -m dehm_onnx <command> ...``.

Each command is a module in ``dehm_onnx.commands`` listed in ``COMMANDS``; it exposes
``register(subparsers)`` (adds its parser and sets ``func=run``) and ``run(args) -> int``.
Exit codes: 0 ok, 1 a bound check failed (``BoundViolation``), 2 bad input or arguments
(running out of memory included: the input or an option asked for more than fits).
Errors are printed as one line on stderr; ``--verbose`` adds the traceback and info logs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

from . import __version__
from .errors import BoundViolation, DehmError

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS = ("dehm_onnx.commands.optimize", "dehm_onnx.commands.verify", "dehm_onnx.commands.compare")

EXIT_OK, EXIT_BOUND, EXIT_INPUT = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2), as for every other bad input."""

    def error(self, message: str):
        self.exit(EXIT_INPUT, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser with every command of ``COMMANDS`` registered."""
    parser = _Parser(
        prog="python -m dehm_onnx",
        description="Compress constant MatMul/Gemm weights of ONNX models into error-bounded H-matrices.",
    )
    parser.add_argument("--version", action="version", version=f"dehm_onnx {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show info logs and tracebacks")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(subparsers)
    for sub in subparsers.choices.values():
        sub.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="show info logs and tracebacks")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args))
    except BoundViolation as e:
        return _fail(e, args.verbose, EXIT_BOUND)
    except (DehmError, ValueError, OSError) as e:
        return _fail(e, args.verbose, EXIT_INPUT)
    except MemoryError as e:
        # Never exit 1 ("a bound check failed"), and no 36-line traceback.
        detail = " ".join(str(e).split())
        text = (
            "ran out of memory" + (f" ({detail})" if detail else "") + "; the model or an option "
            "(--num-samples, --input-shape, --jobs) needs more memory than this machine has"
        )
        return _fail(e, args.verbose, EXIT_INPUT, text)
    except KeyboardInterrupt:
        return _fail(KeyboardInterrupt("interrupted"), args.verbose, 130)


def _fail(error: BaseException, verbose: bool, code: int, text: str | None = None) -> int:
    if verbose:
        traceback.print_exception(error)
    text = text or " ".join(str(error).split()) or type(error).__name__
    # numpy's allocation failure is a private MemoryError subclass; name the public type.
    name = "MemoryError" if isinstance(error, MemoryError) else type(error).__name__
    print(f"error: {name}: {text}", file=sys.stderr)
    return code
