"""Report rendering: table rows, totals, JSON round trip."""

from __future__ import annotations

import json

from dehm_onnx.report import LayerRecord, Report


def _report():
    done = LayerRecord(
        name="fc1", op="MatMul", output="h", weight="w1", shape=[256, 128], compressed=True, tol=1e-3,
        rel_certified_error=5e-4, params=4000, dense_params=32768, blocks={"zero": 2, "dense": 1, "lowrank": 3},
        max_rank=7, permuted=True, emit="subgraph", nodes=12,
    )
    shared = LayerRecord(**{**done.__dict__, "name": "fc1_again", "output": "h2"})
    skipped = LayerRecord(
        name="fc2", op="Gemm", output="y", weight="w2", shape=[128, 64], skip_reason="NOT_SMALLER",
        reason="compressed form would store 9000 >= 8192 parameters at tol 0.001", dense_params=8192,
    )
    return Report(layers=[done, shared, skipped], tol=1e-3, emit="subgraph", bytes_before=200_000, bytes_after=60_000)


def test_report_totals_count_shared_weights_once():
    report = _report()
    assert report.params_before == 32768 + 8192
    assert report.params_after == 4000 + 8192


def test_report_table_has_one_row_per_layer_and_totals():
    lines = _report().to_table().splitlines()
    assert lines[0].split()[:3] == ["layer", "op", "shape"]
    assert any(line.startswith("fc1 ") and "2/1/3" in line and "0.122" in line for line in lines)
    assert any(line.startswith("fc2 ") and "skipped: compressed form would store" in line for line in lines)
    assert lines[-1].startswith("2 of 3 layers compressed") and "200000 -> 60000" in lines[-1]


def test_report_json_round_trip():
    data = json.loads(_report().to_json())
    assert data["totals"]["compressed"] == 2 and data["totals"]["params_after"] == 12192
    assert data["layers"][0]["ratio"] == 4000 / 32768 and data["layers"][2]["ratio"] is None
    assert data["layers"][2]["skip_reason"] == "NOT_SMALLER"
