"""The batched standard-op family: few nodes, and the reference product within float rounding.

The batched family (``dehm_onnx/graph/emit_plan.py``) stacks the factors of same-shaped blocks
into 3-D tensors, so its node count follows the depth of the block tree, not the number of
blocks; the ``blocks`` family (one product per block) is the contrast.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from hmatmul_cases import Case
from hypothesis import given, settings
from hypothesis import strategies as st
from test_hmatmul_cases import assert_matches

from dehm_onnx.graph.emit import EmitContext
from dehm_onnx.graph.emit import layer_model as emitted_layer
from dehm_onnx.hmatrix import compress


def _log_kernel(size: int) -> np.ndarray:
    """``W[i, j] = log|x_i - y_j|`` on interleaved sorted points: hierarchically low-rank."""
    pts = np.sort(np.random.default_rng(0).uniform(0.0, 1.0, 2 * size))
    return np.log(np.abs(pts[0::2, None] - pts[None, 1::2])).astype(np.float32)


def _run(hm, x: np.ndarray, family: str, opset: int = 21):
    """``x @ W_H`` through the ``ops`` emitter with ``family`` forced; (output, node count)."""
    lead = [f"d{i}" for i in range(x.ndim - 1)]
    context = EmitContext(x_rank=x.ndim, opset=opset, family=family)
    model = emitted_layer(hm, "ops", [*lead, hm.shape[0]], x.dtype, "w.hm", opset, context)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"X": x})[0], len(model.graph.node)


@pytest.fixture(scope="module")
def log_kernels():
    """Compressed log kernels of 128, 256 and 512 rows (tol 1e-4, float storage)."""
    return {n: compress(_log_kernel(n), 1e-4, seed=0, precision="float") for n in (128, 256, 512)}


def test_batched_node_count_follows_depth_not_block_count(log_kernels):
    rng = np.random.default_rng(5)
    nodes, per_block = {}, {}
    for n, hm in log_kernels.items():
        x = rng.standard_normal((3, n)).astype(np.float32)
        y, nodes[n] = _run(hm, x, "batched")
        assert_matches(Case(f"log{n}", hm, x), y)
        per_block[n] = _run(hm, x, "blocks")[1]
    blocks = {n: len(hm.blocks) for n, hm in log_kernels.items()}
    assert blocks[512] >= 4 * blocks[128]  # four times the blocks ...
    assert per_block[512] >= 3 * per_block[128]  # ... and the per-block family follows them,
    # while the batched family adds a few nodes per level of the tree (two levels here).
    assert nodes[512] - nodes[128] <= 8 and nodes[512] <= 32, nodes


def test_batched_family_is_chosen_for_a_deep_tree(log_kernels):
    """The cost model prefers few nodes when the bytes are about equal."""
    from dehm_onnx.graph.cost import choose_family

    family, plan = choose_family(log_kernels[512], np.float32, EmitContext(x_rank=2, opset=21))
    assert family == "batched" and plan is not None


@settings(max_examples=12, deadline=None)
@given(
    m=st.integers(24, 160),
    n=st.integers(24, 160),
    tol=st.sampled_from([1e-2, 1e-3, 1e-4]),
    precision=st.sampled_from(["float", "fp16", "int8", "int4"]),
    lead=st.sampled_from([(), (3,), (2, 2)]),
    opset=st.sampled_from([17, 21]),
)
def test_batched_family_matches_reference_product(m, n, tol, precision, lead, opset):
    """Any tree the engine builds (sizes, storages, activation ranks, opsets): the batched
    emission's output is the reference ``X @ W_H`` within float rounding."""
    rng = np.random.default_rng(m * 1000 + n)
    s, t = np.linspace(0, 1, m)[:, None], np.linspace(0, 1, n)[None, :]
    w = (1.0 / (1.0 + 30 * np.abs(s - t)) + 1e-3 * rng.standard_normal((m, n))).astype(np.float32)
    hm = compress(w, tol, seed=0, precision=precision)
    x = rng.standard_normal((*lead, m)).astype(np.float32)
    y, _ = _run(hm, x, "batched", opset)
    assert_matches(Case("hypothesis", hm, x), y)


def test_cost_model_trades_a_few_bytes_for_much_speed_only():
    """Within BYTE_SLACK the faster candidate wins; up to SPEED_BYTE_SLACK larger only when
    SPEEDUP times faster; beyond that the smaller one stays."""
    from dehm_onnx.graph.cost import BYTE_SLACK, SPEED_BYTE_SLACK, SPEEDUP, Candidate, Cost, choose, dense_cost

    dense = dense_cost(1024, 1024)
    slow = Candidate("blocks", None, 1000, Cost(nodes=500, macs=1e5))
    ratio = slow.cost.seconds(1) / dense.seconds(1)
    near = Candidate("batched", None, int(1000 * (1 + BYTE_SLACK)), Cost(nodes=400, macs=1e5))
    assert choose([slow, near], dense) is near
    fast = Candidate("batched", None, int(1000 * (1 + SPEED_BYTE_SLACK)), Cost(nodes=500 / (2 * SPEEDUP), macs=1e5))
    assert ratio > 0.1 and choose([slow, fast], dense) is fast
    too_big = Candidate("batched", None, int(1000 * (1 + SPEED_BYTE_SLACK)) + 2, fast.cost)
    assert choose([slow, too_big], dense) is slow
    merely_faster = Candidate("batched", None, int(1000 * (1 + SPEED_BYTE_SLACK)), Cost(nodes=300, macs=1e5))
    assert choose([slow, merely_faster], dense) is slow


def test_deep_float_tree_keeps_the_batched_family():
    """The 4096² log kernel in float storage: per-block 2354 nodes (about dense speed) against
    a batched plan 18 % larger (with short names) and about 6 times faster by the time model:
    the batched plan is chosen (it was not when the slack for speed was 10 %)."""
    from dehm_onnx.graph.cost import choose_family

    hm = compress(_log_kernel(4096), 1e-4, seed=0, precision="float")
    family, plan = choose_family(hm, np.float32, EmitContext(x_rank=2, opset=21))
    assert family == "batched" and plan is not None


def test_gather_indices_are_stored_narrow_and_widened_at_load(log_kernels, tmp_path):
    """Index arrays of 16 or more entries are stored as uint8/uint16 behind a ``Cast`` that
    onnxruntime folds when the session is created: the file is smaller, the graph it runs has
    no such ``Cast`` left, and the product is unchanged."""
    import onnx

    hm = log_kernels[512]
    context = EmitContext(x_rank=2, opset=21, family="batched")
    model = emitted_layer(hm, "ops", ["d0", 512], np.float32, "w.hm", 21, context)
    inits = {t.name: t for t in model.graph.initializer}
    widened = [n for n in model.graph.node if n.op_type == "Cast" and inits.get(n.input[0]) is not None
               and inits[n.input[0]].data_type in (onnx.TensorProto.UINT8, onnx.TensorProto.UINT16)]
    assert widened, "a 512-row batched layer gathers rows with long index arrays"
    assert all(int(np.prod(inits[n.input[0]].dims)) >= 16 for n in widened)
    assert not [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT32 and np.prod(t.dims) >= 16
                and onnx.numpy_helper.to_array(t).min() >= 0 and onnx.numpy_helper.to_array(t).max() < 65536]
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "session.onnx")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    folded = onnx.load(tmp_path / "session.onnx")
    assert not [n for n in folded.graph.node if n.op_type == "Cast"]
    x = np.random.default_rng(2).standard_normal((5, 512)).astype(np.float32)
    assert_matches(Case("log512", hm, x), session.run(None, {"X": x})[0])
