"""What ``compare`` measures on each method's model: size, errors, latency.

* ``stored_params``: scalars in every initializer and ``Constant`` tensor (all graphs and
  model-local functions), integers included; a ``MatMulNBits`` weight counts ``8 // bits``
  values per stored byte. Pruning adds its sparse-format correction (see ``methods``).
* ``file_bytes``: the size of the model file (plus its external data file, if any).
* ``file_ratio``: ``file_bytes`` over the input model's ``file_bytes``.
* ``output_rel_error``: ``||Y - Y_orig||_2 / ||Y_orig||_2`` over the whole calibration set,
  the largest over the graph outputs (``dehm_onnx.verify``); ``output_max_abs``:
  ``max |Y - Y_orig|``, the largest over the graph outputs; ``output_cosine``:
  ``<Y, Y_orig> / (||Y|| ||Y_orig||)`` over the whole calibration set, the smallest over the
  graph outputs. Each output's own three numbers are kept too (``CompareResult.outputs``).
* ``max_layer_error``: the largest relative Frobenius output error of one MatMul/Gemm layer
  with a constant weight, the layer run alone on the original model's input to it
  (``dehm_onnx.verify``'s isolated measurement; layers inside If/Loop/Scan bodies are not
  measured).
* ``latency_ms``: onnxruntime CPU, ``LATENCY_THREADS`` intra-op threads, spinning off; every
  session runs the first calibration sample in turn, round after round, in one process, and
  the median per method is reported. A model with ``HMatMul`` nodes (emit ``function``,
  optimize's default, or ``custom``) is timed with the compiled kernel library registered
  (``dehm_onnx.ops.library``; if it cannot be built, a ``function`` model is timed on its
  standard-op function bodies, with a warning); with ``stock_latency``, ``function`` models
  are timed on their function bodies, as a stock onnxruntime runs them. Errors are measured by ``dehm_onnx.verify``,
  which runs function bodies on stock onnxruntime and registers the kernel only for models
  that cannot run without it (emit ``custom``).
* ``stock_kernels``: what a stock onnxruntime session (default options, CPU) actually runs
  for the matrix products of a model, read from the graph onnxruntime optimizes
  (``SessionOptions.optimized_model_filepath``): e.g. whether ``DequantizeLinear -> MatMul``
  became ``MatMulNBits`` and at which ``accuracy_level``.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import numpy as np
import onnx

from ..verify import verify

__all__ = [
    "LATENCY_THREADS",
    "stored_params",
    "file_bytes",
    "layer_records",
    "measure_errors",
    "measure_latency",
    "output_summary",
    "stock_kernels",
    "summarize_kernels",
]

logger = logging.getLogger(__name__)

LATENCY_THREADS = 2
# A timed measurement repeats the run until it lasts at least this long (short models).
_MIN_TIMED_SECONDS = 2e-3


def _nbits_weights(model: onnx.ModelProto) -> dict:
    """Packed MatMulNBits weight name -> values per stored element."""
    out = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and len(node.input) > 1:
            bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
            out[node.input[1]] = max(8 // int(bits), 1)
    return out


def stored_params(model: onnx.ModelProto) -> int:
    """Scalars stored in the model's constants (see the module docstring)."""
    from ..model_io import stored_tensors

    packed = _nbits_weights(model)
    return sum(int(np.prod(t.shape.numpy(), dtype=np.int64)) * packed.get(t.name, 1) for t in stored_tensors(model))


def file_bytes(path: Path) -> int:
    """Bytes on disk of the model file and the external data files it names."""
    from ..model_io import data_files

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    return path.stat().st_size + sum(f.stat().st_size for f in data_files(model, path.parent))


def layer_records(model: onnx.ModelProto) -> list:
    """One ``dehm.layers``-style record per main-graph MatMul/Gemm with a constant weight."""
    from ..graph.scan import scan

    return [
        {
            "name": c.name,
            "op": c.op,
            "output": c.output,
            "weight": c.weight_name,
            "shape": list(c.shape),
            "x": c.x_name,
            "x_transposed": c.trans_x,
            "tol": 1.0,  # verify needs a bound; compare reports the measured error only
        }
        for c in scan(model).candidates
        if c.graph_path == "main"
    ]


def measure_errors(original_path: Path, path: Path, calibration, records: list) -> tuple:
    """``(outputs, max_layer_error, {layer name: error})`` of ``path`` against the original.

    ``outputs`` is one dict per graph output: ``name``, ``rel_l2``, ``max_abs``, ``cosine``.
    """
    result = verify(original_path, path, calibration, layers=records)
    per_layer = {layer.name: layer.rel_fro_error for layer in result.layers if layer.checked}
    max_layer = max(per_layer.values(), default=None)
    outputs = [{"name": o.name, "rel_l2": o.rel_l2, "max_abs": o.max_abs, "cosine": o.cosine} for o in result.outputs]
    return outputs, max_layer, per_layer


def _nan_max(values) -> float | None:
    """The largest value, NaN if any is NaN (a NaN output must not hide), None if empty."""
    values = list(values)
    if not values:
        return None
    return float("nan") if any(v != v for v in values) else max(values)


def output_summary(outputs: list) -> dict:
    """The row numbers of per-output errors: worst rel. L2, worst max abs, smallest cosine."""
    return {
        "output_rel_error": _nan_max(o["rel_l2"] for o in outputs) if outputs else 0.0,
        "output_max_abs": _nan_max(o["max_abs"] for o in outputs) if outputs else 0.0,
        "output_cosine": -_nan_max(-o["cosine"] for o in outputs) if outputs else 1.0,
    }


# Op types that carry a model's matrix products (and their quantized forms) in onnxruntime's
# optimized graph; the others are not summarized.
_PRODUCT_OPS = (
    "MatMul",
    "Gemm",
    "FusedMatMul",
    "FusedGemm",
    "MatMulNBits",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "MatMulInteger",
    "QLinearMatMul",
    "DequantizeLinear",
)


def summarize_kernels(model: onnx.ModelProto) -> dict:
    """``{op description: count}`` of the product ops of a (optimized) model's main graph.

    Counted: standard and onnxruntime product ops (``_PRODUCT_OPS``) and every node of dehm's
    own domain (HMatMul and its versions). ``MatMulNBits`` is described with its ``bits`` and
    ``accuracy_level`` (0 when unset, onnxruntime's default for the attribute).
    """
    from ..ops.hmatmul import DOMAIN

    counts: dict = {}
    for node in model.graph.node:
        if node.op_type not in _PRODUCT_OPS and node.domain != DOMAIN:
            continue
        name = node.op_type
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
            name = f"MatMulNBits(bits={attrs.get('bits', 4)}, accuracy_level={attrs.get('accuracy_level', 0)})"
        counts[name] = counts.get(name, 0) + 1
    return counts


def stock_kernels(path: Path) -> str:
    """What stock onnxruntime runs for the products of ``path``, e.g. ``MatMulNBits(bits=8, accuracy_level=4) x1``.

    The session has onnxruntime's default options (the compiled HMatMul library is registered
    only for models that cannot run without it, emit ``custom``). Returns a short note
    instead when onnxruntime cannot load the model.
    """
    import tempfile

    import onnxruntime as ort

    from ..ops.library import make_session

    with tempfile.TemporaryDirectory(prefix="dehm_kernels_") as folder:
        optimized = Path(folder) / "optimized.onnx"
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = 1
        options.optimized_model_filepath = str(optimized)
        try:
            make_session(path, kernel="if_needed", quiet=True, sess_options=options)
            model = onnx.load(str(optimized), load_external_data=False)
        except Exception as e:  # noqa: BLE001 - a note in the table, not a failure of the row
            return f"not read ({type(e).__name__})"
    counts = summarize_kernels(model)
    return ", ".join(f"{name} x{count}" for name, count in counts.items()) or "no matrix products"


def _session(path: Path, stock: bool = False):
    """A timing session. Models with HMatMul nodes (emit "function" or "custom") get the
    compiled kernel when it can be built (``make_session``'s ``prefer``); with ``stock``, only
    models that cannot run without it do (emit "custom"), and "function" models run their
    standard-op bodies, as on a stock onnxruntime."""
    from ..ops.library import make_session

    # No shared SessionOptions: make_session builds fresh ones for a retry with the library.
    spin = {"session.intra_op.allow_spinning": "0"}
    kernel = "if_needed" if stock else "prefer"
    return make_session(path, threads=LATENCY_THREADS, config=spin, kernel=kernel, quiet=True)


def _timed(session, feed: dict, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        session.run(None, feed)
    return (time.perf_counter() - start) / inner


def measure_latency(paths: dict, feed: dict, rounds: int, stock: bool = False) -> tuple:
    """Median milliseconds per run of each model, timed alternately in this process.

    Args:
        paths: label -> model file.
        feed: one input feed (the first calibration sample).
        rounds: timed rounds; each round runs every model once (or ``inner`` times).
        stock: time "function" models on their function bodies (see ``_session``).

    Returns:
        ``({label: ms}, {label: error})``: a model that onnxruntime cannot load or run is
        left out of the timing and reported with its exception instead.
    """
    sessions, inner, failures = {}, {}, {}
    for label, path in paths.items():
        try:
            session = _session(path, stock)
            first = _timed(session, feed, 1)  # warm-up, also sizes the inner loop
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types; reported per row
            failures[label] = e
            continue
        sessions[label] = session
        inner[label] = max(1, int(_MIN_TIMED_SECONDS / max(first, 1e-7)))
    times = {label: [] for label in sessions}
    for _ in range(rounds):
        for label, session in sessions.items():
            times[label].append(_timed(session, feed, inner[label]))
    return {label: 1e3 * statistics.median(values) for label, values in times.items()}, failures
