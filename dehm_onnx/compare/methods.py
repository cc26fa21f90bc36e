"""How each compared method turns the original model into a new one.

=========  ==================================================================================
method     model written
=========  ==================================================================================
original   the input model, unchanged
dehm       ``dehm_onnx.optimize`` at ``tol``, and optionally at a given ``precision`` and
           ``emit`` mode (``dehm_config``: the dehm rows are a function of these three)
svd        every eligible weight W -> ``(X @ U) @ Vt``, the lowest rank meeting ``tol``
           (``baselines.truncated_svd``), spliced by the optimize pass itself
pruning    every eligible weight W -> its magnitude-pruned copy meeting ``tol``, stored dense
           (``baselines.magnitude_prune``)
int8       ``onnxruntime.quantization.quantize_dynamic`` (QInt8 weights, per channel,
           MatMul nodes; activations are quantized at run time)
nbits4     onnxruntime's ``MatMulNBitsQuantizer``: 4-bit weight-only ``MatMulNBits``
           (block 32, symmetric, MatMul nodes); ``int4`` is an older name of it
nbits8     the same quantizer at 8 bits (block 32, symmetric)
=========  ==================================================================================

The ``MatMulNBits`` rows take an optional ``accuracy_level`` (the node attribute; the
quantizer leaves it unset by default, which onnxruntime runs as level 0: float32
arithmetic on the dequantized weight; level 4 quantizes the activations to int8 per block
and runs integer kernels, much faster for 8 bits, less accurate).

Both quantizers handle MatMul only: plain Gemms with a constant B are first rewritten as
MatMul + Add (``gemm_as_matmul``), so that they quantize the same weights as the others.

"Eligible" is decided by the optimize pass's own checks (``OptimizeConfig``: ``min_size``,
``include``/``exclude``, shared weights, dtype ...), so dehm, svd and pruning touch the same
weights at the same certified weight bound. Like dehm, svd and pruning leave a weight dense
when their compressed form would not store fewer parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from ..api import optimize, save_model
from ..compression.parallel import LayerResult
from ..compression.skips import Skip, SkipReason, check_gain
from ..compression.weights import open_weight
from ..config import OptimizeConfig, make_config
from ..errors import CompressionError, ConfigError, InvalidWeightError
from ..graph.rewrite import CompressWeightsPass, select_candidates
from ..hmatrix import Block, BlockKind, HMatrix
from ..model_io import check_model, from_proto
from .baselines import csr_params, magnitude_prune, truncated_svd

__all__ = [
    "Built",
    "MethodSpec",
    "BUILDERS",
    "TOL_METHODS",
    "FIXED_METHODS",
    "METHOD_ALIASES",
    "NBITS_BLOCK_SIZE",
    "ACCURACY_LEVELS",
    "DEHM_OPTIONS",
    "build",
    "dehm_config",
    "check_dehm_options",
    "nbits_quantize",
]

logger = logging.getLogger(__name__)

# Methods that take the --tol values (one row per tol) and those that run once.
TOL_METHODS = ("dehm", "svd", "pruning")
FIXED_METHODS = ("int8", "nbits4", "nbits8")
# Older method names still accepted.
METHOD_ALIASES = {"int4": "nbits4"}
NBITS_BLOCK_SIZE = 32
# MatMulNBits accuracy levels a row may ask for (None: the quantizer's default, unset).
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
# The optimize options a dehm row may set besides tol. Each must be an ``OptimizeConfig``
# field to be used; "precision" arrives with the quantized emission (issue 13 items 2/5):
# until then a row that asks for it is refused by ``check_dehm_options``.
DEHM_OPTIONS = ("precision", "emit")


@dataclass(frozen=True)
class MethodSpec:
    """One row to produce: a method and its parameters.

    Attributes:
        method: one of ``BUILDERS``.
        tol: the certified weight bound (dehm, svd, pruning).
        precision: dehm's ``OptimizeConfig.precision`` (None: optimize's default).
        emit: dehm's ``OptimizeConfig.emit`` (None: the shared config's).
        accuracy_level: the ``MatMulNBits`` attribute (nbits rows; None: left unset).
    """

    method: str
    tol: float | None = None
    precision: str | None = None
    emit: str | None = None
    accuracy_level: int | None = None

    @property
    def family(self) -> str:
        """The method and its variant, without tol: ``dehm``, ``dehm-int8-ops``, ``nbits8-acc4``."""
        parts = [self.method, self.precision, self.emit]
        if self.accuracy_level is not None:
            parts.append(f"acc{self.accuracy_level}")
        return "-".join(p for p in parts if p)

    @property
    def label(self) -> str:
        """The row's ``method`` value, e.g. ``dehm@1e-03``, ``dehm-int8@1e-02``, ``nbits8-acc4``."""
        return self.family if self.tol is None else f"{self.family}@{self.tol:.0e}"

    def dehm_overrides(self) -> dict:
        """The ``OptimizeConfig`` options this row sets besides tol."""
        return {name: getattr(self, name) for name in DEHM_OPTIONS if getattr(self, name) is not None}


def check_dehm_options(overrides: dict) -> None:
    """Refuse dehm options that this build's ``OptimizeConfig`` does not have.

    Raises:
        ConfigError: e.g. ``precision`` before the quantized emission exists.
    """
    known = {f.name for f in dataclasses.fields(OptimizeConfig)}
    missing = [name for name in overrides if name not in known]
    if missing:
        raise ConfigError(
            f"dehm option(s) {missing} are not options of this dehm_onnx's optimize "
            f"(known: {sorted(n for n in DEHM_OPTIONS if n in known)})"
        )
    make_config(None, **overrides)  # validates the values (e.g. an unknown precision)


def dehm_config(config: OptimizeConfig, spec: MethodSpec) -> OptimizeConfig:
    """The optimize options of a dehm row: ``config`` at the row's tol, precision and emit."""
    overrides = spec.dehm_overrides()
    check_dehm_options(overrides)
    return make_config(config, tol=spec.tol, **overrides)


@dataclass
class Built:
    """A method's model on disk and what building it cost.

    Attributes:
        path: the model file.
        seconds: wall time of the transformation (0 for the original).
        params_delta: scalars to add to the file's stored count (pruning: sparse storage
            minus the dense weights it replaces).
        certified: layer name -> certified relative weight error (certified methods only).
    """

    path: Path
    seconds: float
    params_delta: int = 0
    certified: dict = field(default_factory=dict)


def build(spec: MethodSpec, original: onnx.ModelProto, source: Path, config: OptimizeConfig, workdir: Path) -> Built:
    """Write ``spec``'s model into ``workdir`` (``source`` is the original's file)."""
    return BUILDERS[spec.method](spec, original, source, config, workdir)


def _target(workdir: Path, spec: MethodSpec) -> Path:
    return workdir / f"{spec.label.replace('@', '_at_')}.onnx"


def _build_original(spec, original, source, config, workdir) -> Built:
    return Built(Path(source), 0.0)


def _build_dehm(spec, original, source, config, workdir) -> Built:
    start = time.perf_counter()
    model, report = optimize(original, dehm_config(config, spec))
    seconds = time.perf_counter() - start
    path = _target(workdir, spec)
    save_model(model, path)
    certified = {r.name: r.rel_certified_error for r in report.compressed}
    return Built(path, seconds, certified=certified)


def svd_hmatrix(w: np.ndarray, tol: float) -> HMatrix | Skip:
    """A truncated SVD of W as a one-block H-matrix (so the optimize pass can emit it).

    Returns a ``Skip`` (NOT_SMALLER) when the factors would store at least as much as W.
    """
    m, n = w.shape
    cap = (m * n - 1) // (m + n)  # the largest rank with rank * (m + n) < m * n
    factors = truncated_svd(w, tol, max_rank=cap)
    if factors is None:
        itemsize = np.dtype(w.dtype).itemsize
        return Skip.of(SkipReason.NOT_SMALLER, nbytes=(cap + 1) * (m + n) * itemsize, stored=m * n * itemsize, tol=tol)
    block = Block(BlockKind.LOWRANK, 0, m, 0, n, u=factors.u, vt=factors.vt)
    norm = float(np.linalg.norm(w.astype(np.float64)))
    return HMatrix((m, n), np.dtype(w.dtype), (block,), norm, factors.rel_error * norm, tol)


def svd_compressor(tasks, jobs: int = 1, on_done=None) -> list[LayerResult]:
    """A ``Compressor`` for the optimize pass: each weight as a global truncated SVD.

    ``W -> (X @ U) @ Vt``: the ops emitter writes a one-block H-matrix as two MatMuls.
    """
    results = []
    for task in tasks:
        w = open_weight(task.source)
        w = w.T if task.transpose else w
        try:
            hm = svd_hmatrix(w, task.tol)
            stored = task.stored_nbytes if task.stored_nbytes is not None else int(w.nbytes)
            skip = hm if isinstance(hm, Skip) else check_gain(hm.nbytes, stored, task.tol)
        except (InvalidWeightError, CompressionError, np.linalg.LinAlgError) as e:
            skip = Skip.of(SkipReason.COMPRESSION_FAILED, error=str(e))
        results.append(LayerResult(None if skip else hm, skip, int(w.size)))
        if on_done is not None:
            on_done(task, results[-1])
    return results


def _build_svd(spec, original, source, config, workdir) -> Built:
    start = time.perf_counter()
    model = from_proto(original)
    result = CompressWeightsPass(make_config(config, tol=spec.tol), compressor=svd_compressor)(model)
    check_model(result.model, "the SVD model")
    seconds = time.perf_counter() - start
    path = _target(workdir, spec)
    save_model(result.model, path)
    certified = {r.name: r.rel_certified_error for r in result.report.compressed}
    return Built(path, seconds, certified=certified)


def eligible_groups(model: ir.Model, config: OptimizeConfig) -> list:
    """The weights (grouped by stored tensor) that the optimize pass would try to compress."""
    selection = select_candidates(model, config)
    return [g for g in selection.groups if all(id(c) not in selection.skips for c in g.cands)]


def _build_pruning(spec, original, source, config, workdir) -> Built:
    start = time.perf_counter()
    model = from_proto(original)
    delta, certified = 0, {}
    for group in eligible_groups(model, config):
        if any(c.source.nodes for c in group.cands):
            continue  # pruned in place: a stored float tensor only
        w = group.cands[0].source.array()  # pruning is elementwise: the stored orientation is fine
        pruned = magnitude_prune(w, spec.tol)
        sparse = csr_params(pruned.weight)
        if sparse >= w.size:
            continue  # a sparse copy would not be smaller: leave it dense, as dehm does
        tensor = ir.tensor(pruned.weight, name=group.stored.name)
        if group.stored.is_initializer():
            group.stored.const_value = tensor
        else:
            group.cands[0].source.constant_node.attributes["value"] = ir.AttrTensor("value", tensor)
        delta += sparse - w.size
        for cand in group.cands:
            certified[cand.name] = pruned.rel_error
    seconds = time.perf_counter() - start
    path = _target(workdir, spec)
    save_model(model, path)
    return Built(path, seconds, params_delta=delta, certified=certified)


@contextlib.contextmanager
def _quiet_root_logger():
    """Hide the quantizer's advice, which it logs on the root logger at WARNING."""
    root = logging.getLogger()

    def advice(record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()

    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def gemm_as_matmul(model: onnx.ModelProto) -> int:
    """Rewrite main-graph ``Gemm(A, B const[, C])`` (alpha = beta = 1, no transA) as ``MatMul(A, op(B)) [+ C]``.

    onnxruntime's dynamic int8 and MatMulNBits quantizers handle MatMul only; this lets them
    quantize the same weights as the other methods. The last node keeps the Gemm's output
    name. Returns the number of rewritten nodes.
    """
    weights = {t.name: t for t in model.graph.initializer}
    nodes, count = [], 0
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or not plain or node.input[1] not in weights:
            nodes.append(node)
            continue
        b = numpy_helper.to_array(weights[node.input[1]])
        name = f"{node.input[1]}.as_matmul"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(b.T if attrs.get("transB", 0) else b), name))
        has_bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}.matmul" if has_bias else node.output[0]
        nodes.append(onnx.helper.make_node("MatMul", [node.input[0], name], [product], name=f"{node.name}.matmul"))
        if has_bias:
            nodes.append(onnx.helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}.bias"))
        count += 1
    if count:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        used = {i for n in model.graph.node for i in n.input}
        kept = [t for t in model.graph.initializer if t.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    return count


def _matmul_source(original: onnx.ModelProto, source: Path, workdir: Path) -> Path:
    """``source``, or a copy with its Gemms rewritten as MatMuls (see ``gemm_as_matmul``)."""
    model = onnx.ModelProto()
    model.CopyFrom(original)
    if not gemm_as_matmul(model):
        return Path(source)
    path = workdir / "gemm_as_matmul.onnx"
    save_model(model, path)
    return path


def _build_int8(spec, original, source, config, workdir) -> Built:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = _target(workdir, spec)
    start = time.perf_counter()
    source = _matmul_source(original, source, workdir)
    with _quiet_root_logger():
        quantize_dynamic(source, path, op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8)
    return Built(path, time.perf_counter() - start)


def nbits_quantize(model: onnx.ModelProto, bits: int, accuracy_level: int | None = None) -> onnx.ModelProto:
    """onnxruntime's ``MatMulNBitsQuantizer`` on every MatMul with a constant weight.

    Symmetric, blocks of ``NBITS_BLOCK_SIZE`` along K; ``accuracy_level`` None leaves the
    attribute unset (the quantizer's default). ``model`` is left as it was (the quantizer
    rewrites the model it is given, so it gets a copy).
    """
    # Needs the package onnx_ir (a dependency of dehm_onnx).
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    quantizer = MatMulNBitsQuantizer(
        copy,
        bits=bits,
        block_size=NBITS_BLOCK_SIZE,
        is_symmetric=True,
        accuracy_level=accuracy_level,
        op_types_to_quantize=("MatMul",),
    )
    with _quiet_quantizer_info():
        quantizer.process()
    return quantizer.model.model


@contextlib.contextmanager
def _quiet_quantizer_info():
    """The quantizer logs two INFO lines per weight on its own logger; keep them at DEBUG."""
    quantizer_logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quantizer_logger.level
    quantizer_logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        quantizer_logger.setLevel(level)


def _nbits_builder(bits: int):
    def build_nbits(spec, original, source, config, workdir) -> Built:
        start = time.perf_counter()
        model = nbits_quantize(onnx.load(str(_matmul_source(original, source, workdir))), bits, spec.accuracy_level)
        seconds = time.perf_counter() - start
        path = _target(workdir, spec)
        save_model(model, path)
        return Built(path, seconds)

    return build_nbits


BUILDERS = {
    "original": _build_original,
    "dehm": _build_dehm,
    "svd": _build_svd,
    "pruning": _build_pruning,
    "int8": _build_int8,
    "nbits4": _nbits_builder(4),
    "nbits8": _nbits_builder(8),
}
