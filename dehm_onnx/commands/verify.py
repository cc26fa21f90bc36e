"""``python -m dehm_onnx verify ORIG OPT``: check an optimized model's bounds against its original.

Prints the per-layer and per-output table on stdout, optionally writes it as JSON
(``--report``). Exit status (contract 3): 0 if every layer bound holds, 1 if any is violated
(BoundViolation, naming the layer and the numbers), 2 on bad input.
"""

from __future__ import annotations

import os

__all__ = ["register", "run", "add_calibration_arguments"]


def add_calibration_arguments(parser) -> None:
    """Add the calibration options shared by ``verify`` and ``optimize``."""
    parser.add_argument(
        "--calibration",
        action="append",
        default=None,
        metavar="FILE.npz",
        help="calibration samples: arrays keyed by input name, first axis = samples (repeatable); "
        "default: generated from the input signature",
    )
    parser.add_argument(
        "--input-shape",
        action="append",
        default=None,
        metavar="NAME=D1xD2",
        help="shape of a generated input, fixing its dynamic dimensions (repeatable)",
    )
    parser.add_argument(
        "--input-range",
        action="append",
        default=None,
        metavar="NAME=LO:HI",
        help="integer range [LO, HI] of a generated integer input (repeatable)",
    )
    parser.add_argument(
        "--num-samples",
        type=int,
        default=None,
        metavar="N",
        help="number of generated calibration samples",
    )


def register(subparsers) -> None:
    """Add the ``verify`` subcommand."""
    parser = subparsers.add_parser(
        "verify",
        help="check an optimized model's per-layer error bounds against the original model",
        description="Run ORIG and OPT on calibration inputs and check every compressed layer's "
        "relative output error against the bound recorded in OPT's dehm.layers metadata.",
    )
    parser.add_argument("orig", metavar="ORIG", help="the original .onnx model")
    parser.add_argument("opt", metavar="OPT", help="the optimized .onnx model (written by optimize)")
    add_calibration_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of generated calibration inputs")
    parser.add_argument("--report", metavar="FILE.json", help="also write the results as JSON")
    parser.set_defaults(func=run)


def _write_report(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    os.replace(tmp, path)


def run(args) -> int:
    """Verify ORIG against OPT; print the table; raise BoundViolation if a bound fails."""
    from ..verify import verify

    result = verify(
        args.orig,
        args.opt,
        calibration=args.calibration,
        input_shapes=args.input_shape,
        input_ranges=args.input_range,
        num_samples=args.num_samples,
        seed=args.seed,
    )
    print(result.table())
    if args.report:
        _write_report(args.report, result.to_json())
    result.raise_if_violated()
    return 0
