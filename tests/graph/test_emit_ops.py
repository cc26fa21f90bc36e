"""Standard-op emission of hand-made H-matrices, checked in onnxruntime against ``HMatrix.matmul``.

Activations are float64 so that any wiring error (offsets, permutations, transposes) shows
far above the rounding level.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from dehm_onnx.config import EMIT_MODES
from dehm_onnx.graph.emit import EMITTERS
from dehm_onnx.graph.emit_ops import emit_ops
from dehm_onnx.hmatrix import Block, BlockKind, HMatrix
from tests.conftest import run_model

EXACT = 1e-12


def _hm(shape, blocks, row_perm=None, col_perm=None):
    return HMatrix(tuple(shape), np.dtype(np.float64), tuple(blocks), 1.0, 0.0, 0.1, row_perm, col_perm)


def _block(rng, kind, r0, r1, c0, c1, rank=2):
    if kind == BlockKind.DENSE:
        return Block(kind, r0, r1, c0, c1, dense=rng.standard_normal((r1 - r0, c1 - c0)))
    if kind == BlockKind.LOWRANK:
        return Block(kind, r0, r1, c0, c1, u=rng.standard_normal((r1 - r0, rank)), vt=rng.standard_normal((rank, c1 - c0)))
    return Block(kind, r0, r1, c0, c1)


def emission_model(hm, dtype, x_shape, prefix="w.hm") -> onnx.ModelProto:
    """A model ``y = x @ W_H`` made of exactly what ``emit_ops`` returns."""
    elem = ir.DataType.from_numpy(np.dtype(dtype))
    x = ir.Value(name="x", type=ir.TensorType(elem), shape=ir.Shape(list(x_shape)))
    emission = emit_ops(hm, x, prefix, dtype)
    assert emission.functions == [] and emission.nodes[-1].outputs[0] is emission.output
    y = emission.output
    y.name, y.type, y.shape = "y", ir.TensorType(elem), ir.Shape(list(x_shape[:-1]) + [hm.shape[1]])
    graph = ir.Graph([x], [y], nodes=emission.nodes, initializers=emission.initializers, opset_imports={"": 17}, name="emit")
    return ir.serde.serialize_model(ir.Model(graph, ir_version=10))


def _run(hm, x):
    model = emission_model(hm, np.float64, x.shape)
    nodes, inits = model.graph.node, model.graph.initializer
    assert all(n.name.startswith("w.hm/") for n in nodes) and all(t.name.startswith("w.hm/") for t in inits)
    onnx.checker.check_model(model, full_check=True)
    return run_model(model, {"x": x})[0], nodes


def _check(hm, rng, lead=(3,)):
    x = rng.standard_normal(tuple(lead) + (hm.shape[0],))
    y, nodes = _run(hm, x)
    expected = hm.matmul(x)
    assert np.abs(y - expected).max() <= EXACT * max(1.0, np.abs(expected).max())
    return nodes


def test_emitters_registry_starts_with_ops_and_matches_the_config_modes():
    assert list(EMITTERS)[0] == "ops" and EMITTERS["ops"] is emit_ops
    assert tuple(EMITTERS) == EMIT_MODES


def test_emit_hierarchical_blocks_with_permutations(rng):
    # HODLR-like 8x8: low-rank off-diagonal quadrants, recursively split diagonal.
    blocks = [
        _block(rng, BlockKind.LOWRANK, 0, 4, 4, 8),
        _block(rng, BlockKind.LOWRANK, 4, 8, 0, 4),
        _block(rng, BlockKind.DENSE, 0, 2, 0, 2),
        _block(rng, BlockKind.ZERO, 0, 2, 2, 4),
        _block(rng, BlockKind.LOWRANK, 2, 4, 0, 2, rank=1),
        _block(rng, BlockKind.DENSE, 2, 4, 2, 4),
        _block(rng, BlockKind.DENSE, 4, 8, 4, 8),
    ]
    hm = _hm((8, 8), blocks, rng.permutation(8), rng.permutation(8))
    nodes = _check(hm, rng, lead=(2, 3))
    ops = [n.op_type for n in nodes]
    assert ops[0] == "Gather" and ops[-1] == "Gather"
    # Low-rank blocks are applied as (x_b U) Vt: no MatMul of two constants.
    inits_only = {n.input[1] for n in nodes if n.op_type == "MatMul"}
    assert all(n.input[0] not in inits_only for n in nodes if n.op_type == "MatMul")


def test_emit_one_matmul_per_column_range(rng):
    # Two dense blocks stacked in one column range share a single slice-free MatMul.
    blocks = [_block(rng, BlockKind.DENSE, 0, 3, 0, 5), _block(rng, BlockKind.DENSE, 3, 6, 0, 5)]
    nodes = _check(_hm((6, 5), blocks), rng)
    assert [n.op_type for n in nodes] == ["MatMul"]


def test_emit_low_rank_blocks_of_one_column_range_share_the_vt_matmul(rng):
    blocks = [_block(rng, BlockKind.LOWRANK, 0, 3, 0, 5), _block(rng, BlockKind.LOWRANK, 3, 6, 0, 5)]
    nodes = _check(_hm((6, 5), blocks), rng)
    assert sorted(n.op_type for n in nodes) == ["Concat", "MatMul", "MatMul", "MatMul", "Slice", "Slice"]


def test_emit_zero_blocks_emit_no_products(rng):
    blocks = [_block(rng, BlockKind.ZERO, 0, 4, 0, 3), _block(rng, BlockKind.DENSE, 0, 4, 3, 6), _block(rng, BlockKind.ZERO, 0, 4, 6, 9)]
    nodes = _check(_hm((4, 9), blocks), rng)
    # batched family: the dense block's product only; per-block family: that and two zero fillers
    assert len([n for n in nodes if n.op_type == "MatMul"]) in (1, 3)


def test_emit_all_zero_matrix(rng):
    _check(_hm((5, 4), [_block(rng, BlockKind.ZERO, 0, 5, 0, 4)]), rng)


def test_emit_overlapping_column_ranges_are_split(rng):
    # Column ranges [0,3) and [2,5) overlap without nesting (not a tree tiling).
    blocks = [
        _block(rng, BlockKind.LOWRANK, 0, 2, 0, 3),
        _block(rng, BlockKind.DENSE, 0, 2, 3, 5),
        _block(rng, BlockKind.DENSE, 2, 4, 0, 2),
        _block(rng, BlockKind.LOWRANK, 2, 4, 2, 5),
    ]
    _check(_hm((4, 5), blocks), rng)


def test_emit_one_dimensional_activation(rng):
    blocks = [_block(rng, BlockKind.LOWRANK, 0, 6, 0, 4)]
    _check(_hm((6, 4), blocks), rng, lead=())


@st.composite
def _tilings(draw):
    """Random recursive tilings with random block kinds and permutations."""
    m = draw(st.integers(1, 12))
    n = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    blocks = []

    def split(r0, r1, c0, c1, depth):
        can_split = (r1 - r0 > 1 or c1 - c0 > 1) and depth < 3
        if can_split and draw(st.booleans()):
            if r1 - r0 > 1 and (c1 - c0 == 1 or draw(st.booleans())):
                r = draw(st.integers(r0 + 1, r1 - 1))
                split(r0, r, c0, c1, depth + 1)
                split(r, r1, c0, c1, depth + 1)
            else:
                c = draw(st.integers(c0 + 1, c1 - 1))
                split(r0, r1, c0, c, depth + 1)
                split(r0, r1, c, c1, depth + 1)
            return
        kind = draw(st.sampled_from(list(BlockKind)))
        blocks.append(_block(rng, kind, r0, r1, c0, c1, rank=draw(st.integers(1, 3))))

    split(0, m, 0, n, 0)
    row_perm = rng.permutation(m) if draw(st.booleans()) else None
    col_perm = rng.permutation(n) if draw(st.booleans()) else None
    return _hm((m, n), blocks, row_perm, col_perm), seed


@settings(max_examples=40, deadline=None)
@given(_tilings())
def test_emit_random_tilings_match_reference(case):
    hm, seed = case
    _check(hm, np.random.default_rng(seed + 1))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_emit_stores_factors_in_activation_dtype(rng, dtype):
    hm = _hm((4, 4), [_block(rng, BlockKind.LOWRANK, 0, 4, 0, 4)])
    inits = emission_model(hm, dtype, (2, 4), prefix="p").graph.initializer
    float_types = {t.data_type for t in inits if t.data_type != onnx.TensorProto.INT64}
    assert float_types == {helper.np_dtype_to_tensor_dtype(np.dtype(dtype))}


def test_onnxruntime_does_not_fold_factors_back_into_dense_blocks(rng, tmp_path):
    """With every graph optimization on, the session's graph still stores only the factors."""
    import onnxruntime as ort

    blocks = [_block(rng, BlockKind.LOWRANK, 0, 64, 0, 64, rank=3), _block(rng, BlockKind.LOWRANK, 64, 128, 0, 64, rank=3)]
    hm = _hm((128, 64), blocks)
    model = emission_model(hm, np.float32, ("B", 128))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "session.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    folded = onnx.load(tmp_path / "session.onnx")
    stored = sum(int(np.prod(t.dims)) for t in folded.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    assert stored <= hm.params < 128 * 64
