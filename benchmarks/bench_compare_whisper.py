"""compare on the mel-spectrogram preprocessors of the onnx-asr 0.12.0 wheel (Whisper and NeMo).

Run by hand:  python benchmarks/bench_compare_whisper.py [--models whisper128 whisper80 nemo128]
              [--tols 1e-4 1e-3 1e-2]

Each model computes log-mel features from raw 16 kHz audio (``waveforms`` [batch, N],
``waveforms_lens`` [batch]); its one MatMul multiplies the power spectrogram by a banded mel
filterbank (201 x 128 or 201 x 80 for Whisper; 257 x 128 for NeMo). Calibration: 4 synthetic
one-second signals (harmonic tones with vibrato and an amplitude envelope, plus noise bursts),
seeded. Whisper pads every input to 30 s, so one run costs the same whatever N.
"""

from __future__ import annotations

import argparse

import numpy as np

from _compare_common import run_compare
from models.fetch import fetch_wheel_member

PACKAGE, VERSION = "onnx-asr", "0.12.0"
RATE = 16000
SAMPLES = 4


def synthetic_speechlike(rng, seconds: float = 1.0) -> np.ndarray:
    """A harmonic tone (random pitch, vibrato, 8 partials), an envelope and noise bursts."""
    t = np.arange(int(RATE * seconds)) / RATE
    pitch = rng.uniform(90, 250) * (1 + 0.03 * np.sin(2 * np.pi * rng.uniform(3, 7) * t))
    phase = 2 * np.pi * np.cumsum(pitch) / RATE
    tone = sum(np.sin(k * phase) / k for k in range(1, 9))
    envelope = 0.5 * (1 - np.cos(2 * np.pi * t / seconds)) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t) ** 2)
    bursts = rng.standard_normal(t.size) * (np.sin(2 * np.pi * 2.5 * t) > 0.8)
    signal = 0.2 * tone * envelope + 0.02 * bursts
    return signal.astype(np.float32)


def calibration(rng) -> dict:
    waves = np.stack([synthetic_speechlike(rng) for _ in range(SAMPLES)])[:, None, :]
    lens = np.full((SAMPLES, 1), waves.shape[-1], dtype=np.int64)
    return {"waveforms": waves, "waveforms_lens": lens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["whisper128", "whisper80", "nemo128"])
    parser.add_argument("--tols", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2])
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args()
    for name in args.models:
        path = fetch_wheel_member(PACKAGE, VERSION, f"onnx_asr/preprocessors/data/{name}.onnx")
        calib = calibration(np.random.default_rng(0))
        run_compare(
            path, f"asr_{name}", f"onnx-asr {VERSION} {name}.onnx (mel preprocessor)",
            tols=args.tols, calibration=calib, rounds=args.rounds,
        )


if __name__ == "__main__":
    main()
