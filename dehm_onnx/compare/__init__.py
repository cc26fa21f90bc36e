"""Compare dehm's H-matrices with the usual ways of shrinking a model, measured on one model.

``compare(model, tols=...)`` builds, from the same model and on the same calibration set:
``original``; ``dehm``, ``svd`` and ``pruning`` at each certified weight bound ``tol``
(``||W - W~||_F <= tol ||W||_F`` per weight); ``int8`` (onnxruntime dynamic quantization)
and ``int4`` (onnxruntime MatMulNBits). Each row has exactly ``ROW_KEYS``; ``measure``
defines every number and ``methods`` every method. ``python -m dehm_onnx compare`` is the CLI.
"""

from .core import DEFAULT_ROUNDS, DEFAULT_TOLS, METHODS, ROW_KEYS, CompareResult, compare, plan_rows
from .render import markdown_table, write_json, write_markdown, write_plot

__all__ = [
    "DEFAULT_ROUNDS",
    "DEFAULT_TOLS",
    "METHODS",
    "ROW_KEYS",
    "CompareResult",
    "compare",
    "markdown_table",
    "plan_rows",
    "write_json",
    "write_markdown",
    "write_plot",
]
