"""``python -m dehm_onnx verify ORIG OPT``: check an optimized model's bounds against its original.

Prints the per-layer and per-output table on stdout, optionally writes it as JSON
(``--report``). Exit status: 0 if every layer bound holds, 1 if any is violated
(BoundViolation, naming the layer and the numbers), 2 on bad input.
"""

from __future__ import annotations

from ..config import add_config_arguments, config_from_args

__all__ = ["register", "run", "CALIBRATION_OPTIONS"]

# The OptimizeConfig fields whose flags verify (and compare) share with optimize.
CALIBRATION_OPTIONS = ("calibration", "input_shape", "input_range", "num_samples", "seed")


def register(subparsers) -> None:
    """Add the ``verify`` subcommand."""
    parser = subparsers.add_parser(
        "verify",
        help="check an optimized model's per-layer error bounds against the original model",
        description="Run ORIG and OPT on calibration inputs and check every compressed layer's "
        "relative output error against the bound recorded in OPT's dehm.layers metadata.",
    )
    parser.add_argument("orig", metavar="ORIG", help="the original .onnx model (never modified)")
    parser.add_argument("opt", metavar="OPT", help="the optimized .onnx model, written by optimize (never modified)")
    add_config_arguments(parser, CALIBRATION_OPTIONS)
    parser.add_argument("--report", metavar="FILE.json", help="also write the results as JSON")
    parser.set_defaults(func=run)


def run(args) -> int:
    """Verify ORIG against OPT; print the table; raise BoundViolation if a bound fails."""
    from ..api import model_files
    from ..files import PathRole, check_paths, write_text
    from ..verify import verify

    config = config_from_args(args)
    if args.report:
        reads = model_files(args.orig, "ORIG") + model_files(args.opt, "OPT")
        reads += [PathRole("--calibration", c) for c in config.calibration]
        check_paths(reads, [PathRole("--report", args.report)])
    result = verify(
        args.orig,
        args.opt,
        calibration=list(config.calibration) or None,
        input_shapes=list(config.input_shape) or None,
        input_ranges=list(config.input_range) or None,
        num_samples=config.num_samples,
        seed=config.seed,
    )
    print(result.table())
    if args.report:
        write_text(args.report, result.to_json() + "\n")
    result.raise_if_violated()
    return 0
