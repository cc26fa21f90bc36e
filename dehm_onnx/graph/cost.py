"""The cost model: which standard-op emission to write for a compressed weight.

Every candidate emission (the ``blocks`` family, and ``batched`` plans with their bands
joined in every way; ``emit_plan``) gets

- its **bytes** in the file: the tensors it stores plus a protobuf estimate per node and per
  initializer (``NODE_BYTES``, ``INITIALIZER_BYTES``);
- its **time** in onnxruntime at batch ``N``, a linear model of what it executes after the
  load-time folding of constants (``Cost``)::

      t(N) = a*nodes + b*gemms + c*gathered + d*N*copies + e*N*macs + f*weight_bytes

  ``nodes``: nodes that run; ``gemms``: the small products inside batched MatMuls (one per
  tile); ``gathered``: Gather indices; ``copies``: activation elements moved per batch row
  (Transpose, Gather, Concat, Pad, Slice, Sum); ``macs``: multiply-adds per batch row;
  ``weight_bytes``: bytes of constants read per run (as onnxruntime holds them).

``COEFFICIENTS`` (a..f) were fitted by ``benchmarks/bench_emit_cost.py`` on the development
machine (onnxruntime 1.32, 2 threads, spinning off); docs/custom_op.md gives the measurements.

The choice (``choose``): among the candidates whose bytes are within ``BYTE_SLACK`` of the
smallest, the one with the least ``t(1)/t_dense(1) + t(256)/t_dense(256)``, where ``t_dense``
is the same model for the dense MatMul; a candidate at most ``SPEED_BYTE_SLACK`` larger
replaces it when that score is ``SPEEDUP`` times lower. Bytes come first because they are
what the user pays for in every deployment; the time estimate picks among emissions of about
the same size, and a few percent of bytes buy an order of magnitude of speed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields

import numpy as np

from ..hmatrix import Storage
from .emit_plan import BatchedBuilder, Plan, PlanOptions, terms_of

__all__ = [
    "Cost",
    "COEFFICIENTS",
    "BYTE_SLACK",
    "SPEED_BYTE_SLACK",
    "NODE_BYTES",
    "INITIALIZER_BYTES",
    "Candidate",
    "plan_cost",
    "plan_bytes",
    "dense_cost",
    "choose",
    "choose_family",
]

# Fitted by benchmarks/bench_emit_cost.py (seconds per unit): node, gemm, gather index, copied
# element, multiply-add, weight byte. 2026-12-02, 2-core development VM under load ~2.7,
# onnxruntime 1.32, 2 threads: median relative error 0.22 (max 0.55) over 60 timings; the
# previous hand-set values (4e-6, 2.5e-7, 8e-9, 1e-9, 1.2e-10, 6e-11) had 0.95 (max 6.0).
COEFFICIENTS = {"nodes": 1.3e-6, "gemms": 2.4e-7, "gathered": 1.1e-8, "copies": 6.7e-10, "macs": 2.1e-11, "weight_bytes": 2.5e-11}
# Protobuf bytes of one emitted node (name, input and output names, attributes) and of one
# initializer's header (name, dims, type), with the short names of graph/names.py: 46 and 15
# on average over the whisper128 filterbank's batched emission (rounded up).
NODE_BYTES = 50
INITIALIZER_BYTES = 20
# Candidates within this fraction of the smallest candidate's bytes compete on time.
BYTE_SLACK = 0.03
# ... but a candidate up to this fraction larger wins when its time estimate is SPEEDUP times
# lower: e.g. the 4096^2 log kernel at tol 1e-4 in float, per-block 1.65 MB and 2354 nodes
# (1.3x dense at batch 1, measured) against batched 1.94 MB (+18% with the short names of
# graph/names.py, +6.3% with the long ones) and 40 nodes (about 10x).
SPEED_BYTE_SLACK = 0.20
SPEEDUP = 4.0
# Batch sizes the time estimate weighs equally (as ratios to dense).
BATCHES = (1, 256)
# Contiguous joins of more column size classes than this are not all tried.
_MAX_CLASSES_EXHAUSTIVE = 10


@dataclass
class Cost:
    """What an emission executes per run (see the module docstring); adds up over parts."""

    nodes: float = 0.0
    gemms: float = 0.0
    gathered: float = 0.0
    copies: float = 0.0
    macs: float = 0.0
    weight_bytes: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Cost)))

    def add(self, **values) -> None:
        for name, value in values.items():
            setattr(self, name, getattr(self, name) + float(value))

    def seconds(self, batch: int, coefficients: dict | None = None) -> float:
        """Estimated time of one run at batch ``batch``."""
        c = coefficients or COEFFICIENTS
        per_row = c["copies"] * self.copies + c["macs"] * self.macs
        return (c["nodes"] * self.nodes + c["gemms"] * self.gemms + c["gathered"] * self.gathered
                + batch * per_row + c["weight_bytes"] * self.weight_bytes)

    def features(self, batch: int) -> list[float]:
        """The model's inputs at batch ``batch``, in ``COEFFICIENTS`` order (for fitting)."""
        return [self.nodes, self.gemms, self.gathered, batch * self.copies, batch * self.macs, self.weight_bytes]


def dense_cost(m: int, n: int, itemsize: int = 4) -> Cost:
    """One MatMul by a dense ``m x n`` weight."""
    return Cost(nodes=1, gemms=1, macs=m * n, weight_bytes=m * n * itemsize)


def _stack_elements(stack) -> int:
    return int(np.prod(stack.shape))


def plan_cost(plan: Plan, x_rank: int | None = 2) -> Cost:
    """What a batched plan executes (``emit_batched`` writes these nodes)."""
    m, n = plan.shape
    itemsize = np.dtype(plan.dtype).itemsize
    cost = Cost(nodes=2, copies=m + n)  # the two Transposes
    if x_rank != 2:
        cost.add(nodes=5)  # flatten, and restore the leading dimensions
    if plan.row_perm is not None:
        cost.add(nodes=1, gathered=m, copies=m)
    if plan.col_inverse is not None:
        cost.add(nodes=1, gathered=n, copies=n)
    grids = set()
    tilings_done = set()
    for tiles in [lg.tiles for lg in plan.lefts] + [rg.tiles for rg in plan.rights if rg.tiles is not None]:
        if tiles.key in tilings_done:
            continue
        tilings_done.add(tiles.key)
        if tiles.grid:
            grids.add(tiles.S)
            if tiles.slabs is not None:
                cost.add(nodes=1, gathered=tiles.R, copies=tiles.R * tiles.S)
        else:
            cost.add(nodes=2, gathered=tiles.R * tiles.S, copies=tiles.R * tiles.S)
    cost.add(nodes=len(grids))
    for lg in plan.lefts:
        R, K, S = lg.stack.shape
        cost.add(nodes=2, gemms=R, macs=R * K * S, weight_bytes=R * K * S * itemsize)
    for rg in plan.rights:
        elements = rg.C * rg.c * rg.J
        cost.add(nodes=2, gemms=rg.C, macs=elements, weight_bytes=elements * itemsize)
        if rg.tiles is not None:
            if rg.slabs is not None:
                cost.add(nodes=2, gathered=rg.slabs.values.size, copies=rg.C * rg.J)
        else:
            cost.add(nodes=2, gathered=rg.C * rg.J, copies=rg.C * rg.J)
            if len(rg.sources) > 1:
                sizes = {lg.key: lg.stack.shape[0] * lg.stack.shape[1] for lg in plan.lefts}
                cost.add(nodes=1, copies=sum(m if s == "x" else sizes[s] for s in rg.sources))
        if rg.placement is not None:
            cost.add(nodes=2, gathered=n, copies=rg.C * rg.c + n)
    if len(plan.rights) > 1:
        cost.add(nodes=1, copies=n * (len(plan.rights) - 1))
    return cost


def plan_bytes(plan: Plan, opset: int) -> int:
    """File bytes of a batched plan: tensors (int4 as int8 below opset 21) and protobuf."""
    total = 0
    for t in plan.tensors:
        total += t.values.size if t.storage == Storage.INT4 and opset < 21 else t.nbytes
        total += INITIALIZER_BYTES
    return total + NODE_BYTES * _plan_node_count(plan)


def _plan_node_count(plan: Plan) -> int:
    """Nodes in the file: what runs plus the load-time folding of each stack part."""
    folding = 0
    for group in [*plan.lefts, *plan.rights]:
        parts = group.stack.parts
        folding += (len(parts) > 1) + sum(1 if p.storage == Storage.FP16 else 3 * p.storage.is_int for p in parts)
    return int(plan_cost(plan).nodes) + folding


@dataclass
class Candidate:
    """One way to emit a weight: its family, plan (batched), bytes and estimated times."""

    family: str
    plan: Plan | None
    nbytes: int
    cost: Cost

    def score(self, dense: Cost) -> float:
        return sum(self.cost.seconds(b) / dense.seconds(b) for b in BATCHES)


def _partitions(count: int):
    """Every split of ``count`` ordered classes into runs (as run lengths)."""
    for cuts in itertools.product((False, True), repeat=max(count - 1, 0)):
        runs, length = [], 1
        for cut in cuts:
            if cut:
                runs.append(length)
                length = 1
            else:
                length += 1
        runs.append(length)
        yield tuple(runs)


def batched_candidates(hm, dtype, context) -> list[Candidate]:
    """Batched plans of ``hm`` for every join of its bands (or the first few when there are
    many column size classes) and with dense groups on and off."""
    builder = BatchedBuilder(hm, dtype)
    if builder.empty:
        return []
    classes = len(builder.col_classes)
    options = []
    if classes <= _MAX_CLASSES_EXHAUSTIVE:
        runs = list(_partitions(classes)) if classes else [()]
    else:
        runs = [tuple([1] * classes)] + [(k, classes - k) for k in range(1, classes)]
    for bands in runs:
        for grouped in (True, False):
            options.append(PlanOptions(bands=bands, dense_groups=grouped))
    out = []
    for option in options:
        plan = builder.plan(option)
        if plan is not None:
            out.append(Candidate("batched", plan, plan_bytes(plan, context.opset), plan_cost(plan, context.x_rank)))
    return out


def _fastest_within(candidates: list[Candidate], dense: Cost, slack: float) -> Candidate:
    smallest = min(c.nbytes for c in candidates)
    near = [c for c in candidates if c.nbytes <= (1 + slack) * smallest]
    return min(near, key=lambda c: (c.score(dense), c.nbytes))


def choose(candidates: list[Candidate], dense: Cost) -> Candidate:
    """The fastest (by the time model) of the candidates within ``BYTE_SLACK`` of the smallest,
    unless one within ``SPEED_BYTE_SLACK`` is estimated ``SPEEDUP`` times faster still."""
    best = _fastest_within(candidates, dense, BYTE_SLACK)
    fast = _fastest_within(candidates, dense, SPEED_BYTE_SLACK)
    return fast if SPEEDUP * fast.score(dense) <= best.score(dense) else best


def choose_family(hm, dtype, context, memory_slack: float | None = None) -> tuple[str, Plan | None]:
    """``("batched", plan)`` or ``("blocks", None)`` for ``emit_ops`` (``context.family``
    forces one; batched plans need opset 14 when the activation is not known to be 2-D).

    ``memory_slack`` (a function body, whose candidates' bytes are memory after folding, not
    file bytes): the fastest candidate within this fraction of the smallest bytes replaces
    ``choose``'s when it is ``SPEEDUP`` times faster still."""
    from .emit_ops import blocks_candidate

    if context.family == "blocks" or not terms_of(hm):
        return "blocks", None
    if context.x_rank != 2 and context.opset < 14:
        return "blocks", None
    if context.family == "batched" and context.options is not None:
        return "batched", None
    candidates = batched_candidates(hm, dtype, context)
    if context.family == "auto":
        candidates.append(blocks_candidate(hm, dtype, context))
    if not candidates:
        return "blocks", None
    dense = dense_cost(*hm.shape, np.dtype(dtype).itemsize)
    best = choose(candidates, dense)
    if memory_slack is not None:
        fast = _fastest_within(candidates, dense, memory_slack)
        if SPEEDUP * fast.score(dense) <= best.score(dense):
            best = fast
    return best.family, best.plan
