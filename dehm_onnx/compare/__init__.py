"""Compare dehm's H-matrices with the usual ways of shrinking a model, measured on one model.

``compare(model, tols=...)`` builds, from the same model and on the same calibration set:
``original``; ``dehm`` (at each tol, and optionally each precision and emission mode),
``svd`` and ``pruning`` at each certified weight bound ``tol``
(``||W - W~||_F <= tol ||W||_F`` per weight); ``int8`` (onnxruntime dynamic quantization),
``nbits4`` and ``nbits8`` (onnxruntime's 4- and 8-bit weight-only MatMulNBits). Each row has
exactly ``ROW_KEYS``, including a ``pareto`` flag (no other row has at most its file bytes and
at most its output error); ``measure`` defines every number and ``methods`` every method.
``python -m dehm_onnx compare`` is the CLI.
"""

from .core import (
    DEFAULT_ROUNDS,
    DEFAULT_TOLS,
    JSON_KEYS,
    METHODS,
    PARETO_AXES,
    ROW_KEYS,
    CompareResult,
    compare,
    plan_rows,
)
from .pareto import pareto_flags
from .render import markdown_table, pareto_table, write_json, write_markdown, write_plot

__all__ = [
    "DEFAULT_ROUNDS",
    "DEFAULT_TOLS",
    "JSON_KEYS",
    "METHODS",
    "PARETO_AXES",
    "ROW_KEYS",
    "CompareResult",
    "compare",
    "markdown_table",
    "pareto_flags",
    "pareto_table",
    "plan_rows",
    "write_json",
    "write_markdown",
    "write_plot",
]
