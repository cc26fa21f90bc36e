"""``--emit function`` with a batched body: the stacks of the batched plan built from the
packed arrays, folded by stock onnxruntime into the graph the ``ops`` emission runs.

The body reads only the layer's packed inputs (stored once, as ``custom`` stores them); its
stack assembly depends only on them, so onnxruntime folds it at session creation and runs
the batched plan's few nodes, whatever the storage of the arrays.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hmatmul_cases import CASES, CASES_V2, Case
from hypothesis import assume, given, settings
from test_emit_function_v2 import _assert_stored_once, _check_folded
from test_hmatmul_cases import assert_matches
from test_hmatmul_v2_properties import cases

from dehm_onnx.graph.cost import batched_candidates
from dehm_onnx.graph.emit import EmitContext, layer_model
from dehm_onnx.graph.emit_function import as_float
from dehm_onnx.graph.emit_plan import stack_values, terms_of
from dehm_onnx.hmatrix import compress
from dehm_onnx.ops import hmatmul
from dehm_onnx.ops.library import make_session

OPSET = 21
# An H-matrix with no nonzero block has no batched plan (its body writes zeros): left out.
WITH_TERMS = [c for c in CASES + CASES_V2 if terms_of(c.hm)]
FLOAT_WITH_TERMS = [c for c in CASES if terms_of(c.hm)]


def _model(hm, x: np.ndarray, mode: str, family: str) -> onnx.ModelProto:
    lead = [f"d{i}" for i in range(x.ndim - 1)]
    context = EmitContext(x_rank=None, opset=OPSET, family=family)
    model = layer_model(hm, mode, [*lead, hm.shape[0]], x.dtype, "layer.w.hm", OPSET, context)
    onnx.checker.check_model(model, full_check=True)
    return model


def _optimized(model: onnx.ModelProto, tmp_path, name: str):
    """A stock CPU session and the op types of the graph onnxruntime runs."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / f"{name}.onnx")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(options.optimized_model_filepath)
    return session, optimized, collections.Counter(n.op_type for n in optimized.graph.node)


def _rebuilt(stack) -> np.ndarray:
    """A stack made from its ``vectors`` map alone (float64)."""
    out = np.zeros(stack.shape)
    for (p, q), (arr, k, start, stop) in stack.vectors.items():
        values = arr.dequantized().astype(np.float64)
        if stack.axis == 1:
            out[p, q, : stop - start] = values[start:stop, k]
        else:
            out[p, : stop - start, q] = values[k, start:stop]
    return out


@settings(max_examples=60, deadline=None)
@given(cases())
def test_stack_vectors_rebuild_every_stack(case):
    """Random trees of every storage: in every plan the cost model prices, the vectors map of
    each stack gives back exactly the values onnxruntime folds the stored stack into."""
    hm = case.hm
    assume(terms_of(hm))
    for candidate in batched_candidates(hm, hm.dtype, EmitContext(x_rank=None, opset=OPSET)):
        plan = candidate.plan
        for group in [*plan.lefts, *plan.rights]:
            np.testing.assert_array_equal(_rebuilt(group.stack), stack_values(group.stack, np.float64))


@pytest.mark.parametrize("case", WITH_TERMS, ids=[c.name for c in WITH_TERMS])
def test_batched_body_matches_the_conformance_table(case, tmp_path):
    """Every hand-built tree through a batched body on stock onnxruntime, and the kernel on
    the same file."""
    model = _model(case.hm, case.x, "function", "batched")
    body = next(f for f in model.functions if f.name == hmatmul.OP_TYPE)
    assert {"MatMul", "Reshape", "Transpose"} <= {n.op_type for n in body.node}
    session, optimized, _ = _optimized(model, tmp_path, "function")
    assert_matches(case, session.run(None, {"X": case.x})[0])
    _check_folded(optimized)
    assert_matches(case, make_session(model).run(None, {"X": case.x})[0])


@pytest.mark.parametrize("case", FLOAT_WITH_TERMS, ids=[c.name for c in FLOAT_WITH_TERMS])
def test_batched_body_runs_the_ops_emission(case, tmp_path):
    """After folding, stock onnxruntime runs the ``ops`` file's products for the
    function file and nothing more (the body's assembly leaves nothing behind, float16 stacks
    included; equal index constants are one ``Constant`` in a body, so onnxruntime may merge
    two equal row gathers there)."""
    _, _, function_ops = _optimized(_model(case.hm, case.x, "function", "batched"), tmp_path, "function")
    # the body computes with float arrays: the ops emission of the same tree in float
    _, _, ops_ops = _optimized(_model(as_float(case.hm), case.x, "ops", "batched"), tmp_path, "ops")
    assert function_ops["MatMul"] == ops_ops["MatMul"]
    assert not function_ops - ops_ops, (function_ops, ops_ops)


@settings(max_examples=25, deadline=None)
@given(cases())
def test_batched_body_random_tilings(tmp_path_factory, case):
    """Random block trees (uneven cuts, tiers of mixed storage, permutations, float16 weights
    and activations) through a batched body: stock onnxruntime and the kernel match the
    product, the decoding is folded, and the weights are stored once."""
    assume(terms_of(case.hm) and not all(b.is_float for b in case.hm.blocks))
    model = _model(case.hm, case.x, "function", "batched")
    _assert_stored_once(model, case.hm)
    session, optimized, _ = _optimized(model, tmp_path_factory.mktemp("fn"), "function")
    assert_matches(case, session.run(None, {"X": case.x})[0])
    _check_folded(optimized)
    assert_matches(case, make_session(model).run(None, {"X": case.x})[0])


def _log_kernel(size: int) -> np.ndarray:
    pts = np.sort(np.random.default_rng(0).uniform(0.0, 1.0, 2 * size))
    return np.log(np.abs(pts[0::2, None] - pts[None, 1::2])).astype(np.float32)


@pytest.mark.parametrize("precision", ["float", "auto"])
def test_default_body_of_a_deep_tree_is_batched(precision, tmp_path):
    """The cost model picks the batched body for a 512² log kernel (float and mixed storage):
    stock onnxruntime runs a few dozen nodes where the blocks body runs hundreds."""
    hm = compress(_log_kernel(512), 1e-4, seed=0, precision=precision)
    x = np.random.default_rng(3).standard_normal((4, 512)).astype(np.float32)
    model = _model(hm, x, "function", "auto")
    session, _, batched = _optimized(model, tmp_path, "auto")
    assert_matches(Case("log512", hm, x), session.run(None, {"X": x})[0])
    _, _, blocks = _optimized(_model(hm, x, "function", "blocks"), tmp_path, "blocks")
    assert sum(batched.values()) <= 40 and sum(blocks.values()) >= 4 * sum(batched.values()), (batched, blocks)


def test_body_family_trades_memory_for_speed_only_when_it_pays():
    """A body's candidates differ in the memory its folded constants take, not in file bytes:
    ``body_family`` keeps the ``ops`` rule's choice unless the fastest candidate within
    ``BODY_MEMORY_SLACK`` of the smallest is ``SPEEDUP`` times faster by the time model."""
    from dehm_onnx.graph.cost import SPEEDUP, batched_candidates, choose, dense_cost
    from dehm_onnx.graph.emit_function import BODY_MEMORY_SLACK, body_family
    from dehm_onnx.graph.emit_ops import blocks_candidate

    for n, tol in ((512, 1e-2), (256, 1e-3)):
        hm = as_float(compress(_log_kernel(n), tol, seed=0, precision="auto"))
        context = EmitContext(x_rank=None, opset=OPSET)
        candidates = batched_candidates(hm, np.float32, context) + [blocks_candidate(hm, np.float32, context)]
        dense = dense_cost(n, n)
        smallest = min(c.nbytes for c in candidates)
        fast = min((c for c in candidates if c.nbytes <= (1 + BODY_MEMORY_SLACK) * smallest), key=lambda c: c.score(dense))
        ruled = choose(candidates, dense)
        expected = fast if SPEEDUP * fast.score(dense) <= ruled.score(dense) else ruled
        family, plan = body_family(hm, np.float32, OPSET)
        assert family == expected.family
        assert plan is None or plan.options == expected.plan.options
    assert body_family(hm, np.float32, 13)[0] == "blocks"  # no batched body before opset 14
