"""Pareto tables of docs/compare.md: every dehm point beside onnxruntime's quantizers, per model.

Run by hand (a few minutes per model on a 2-core machine; MiniLM needs
``pip install torch==2.13.0 transformers`` for its one-time export):

    HF_HUB_OFFLINE=1 python benchmarks/bench_pareto.py [--models log4096 gauss1024 ...]
        [--rounds 11] [--precisions auto float] [--emits function custom]

For each model, ``dehm_onnx.compare`` builds, on one calibration set: the original; dehm at
every tol of the model (and every precision and emission mode asked for); onnxruntime's
dynamic int8 (``quantize_dynamic``); and its 4- and 8-bit weight-only ``MatMulNBits``
(``MatMulNBitsQuantizer``, block 32, symmetric) once as the quantizer writes it (attribute
``accuracy_level`` unset: level 0, float32 arithmetic) and once at ``accuracy_level=4``
(int8 activations, integer kernels). Each is measured by file bytes (model + external data,
relative to the original file), end-to-end error on the calibration set (relative L2, max
abs, cosine; the largest/smallest over graph outputs) and batch-1 latency (medians of
alternating runs in one process, 2 threads, spinning off; ``--emit function`` models are
timed on their standard-op bodies, as a stock onnxruntime runs them, ``custom`` models with
the compiled kernel). "Pareto" marks the rows that no other row beats on both file bytes
and output error.

dehm's precision: while optimize has no ``--precision`` option (quantized emission, issue
13), every dehm row is float storage; once it has, rows are made at each of ``--precisions``
(default ``auto float``).

Models (``--models``; default all):

* ``log4096``: ``y = x @ K``, K the 1-D log kernel on 4096 sorted points
  (``bench_compare_operators.log1d``), 8 smooth random input functions;
* ``gauss1024``: ``y = x @ W``, W Gaussian 1024 x 1024 (no structure), 8 Gaussian inputs;
* ``gauss4096``: the same at 4096 x 4096, 4 inputs, tol 1e-2 only (issue 13's speed target);
* ``demo``: ``models/make_demo.py`` (log kernel, mel filterbank, Gaussian Gemm), 16 inputs;
* ``whisper128``, ``nemo128``, ``kaldi``: onnx-asr 0.12.0 preprocessors on 2 synthetic
  10-second speech-like signals (``bench_compare_whisper.synthetic_speechlike``);
* ``minilm``: all-MiniLM-L6-v2 with mean pooling (``bench_compare_minilm``), 20 sentences;
  task metric: the smallest cosine similarity of a sentence embedding to the original's;
* ``gp_mean``: GP posterior mean, 2048 training points (``bench_compare_operators.gp_mean``).

Writes ``docs/compare/pareto_<model>.json`` (compare's JSON, plus ``task`` where the model has
a task metric), ``.png`` and ``.md`` (the table, with the command
and commit), and ``docs/compare/pareto.md``, every model's ``.md`` present, in the order above;
models are kept in ``$DEHM_CACHE/compare/pareto_<model>/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import time
from dataclasses import dataclass

import numpy as np
import onnx

from _compare_common import DOCS, ROOT, model_dir
from dehm_onnx.compare import compare, pareto_table, write_plot
from dehm_onnx.config import EMIT_MODES, OptimizeConfig

RATE = 16000
AUDIO_SECONDS = 10.0
METHODS = ("original", "dehm", "int8", "nbits4", "nbits8")
ACCURACY_LEVELS = (None, 4)


@dataclass
class Case:
    """One benchmark model: how to make it and its calibration set, and what to run on it."""

    title: str
    make: object  # () -> (model path, calibration dict)
    tols: tuple
    emits: tuple
    task: object = None  # (CompareResult, calibration) -> {"header": {label: text}}
    precisions: tuple | None = None  # dehm precisions, when optimize has them (default: --precisions)


def _matmul_case(name: str, k: np.ndarray, calib: np.ndarray) -> tuple:
    from bench_compare_operators import matmul_model

    path = model_dir(f"pareto_{name}") / f"{name}.onnx"
    if not path.is_file():
        onnx.save(matmul_model(k, name), path)
    return path, {"x": calib}


def make_log4096():
    from bench_compare_operators import log1d, smooth_functions

    k, t = log1d(4096)
    return _matmul_case("log4096", k, smooth_functions(t, np.random.default_rng(3)))


def make_gauss1024():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((1024, 1024)) / np.sqrt(1024)
    return _matmul_case("gauss1024", w, rng.standard_normal((8, 1, 1024)).astype(np.float32))


def make_gauss4096():
    rng = np.random.default_rng(6)
    w = (rng.standard_normal((4096, 4096)) / 64.0).astype(np.float32)
    return _matmul_case("gauss4096", w, rng.standard_normal((4, 1, 4096)).astype(np.float32))


def make_gp_mean():
    from bench_compare_operators import gp_mean

    k, alpha = gp_mean(2048)
    return _matmul_case("gp_mean", k, alpha)


def make_demo():
    from models.make_demo import IN_FEATURES, build

    path = model_dir("pareto_demo") / "demo.onnx"
    if not path.is_file():
        onnx.save(build(), path)
    x = np.random.default_rng(5).standard_normal((16, 1, IN_FEATURES)).astype(np.float32)
    return path, {"x": x}


def _asr(name: str):
    def make():
        from bench_compare_whisper import PACKAGE, VERSION, synthetic_speechlike
        from models.fetch import fetch_wheel_member

        path = fetch_wheel_member(PACKAGE, VERSION, f"onnx_asr/preprocessors/data/{name}.onnx")
        rng = np.random.default_rng(0)
        waves = np.stack([synthetic_speechlike(rng, AUDIO_SECONDS) for _ in range(2)])[:, None, :]
        lens = np.full((2, 1), waves.shape[-1], dtype=np.int64)
        return path, {"waveforms": waves, "waveforms_lens": lens}

    return make


def make_minilm():
    import bench_compare_minilm as minilm

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = minilm.model_folder()
    path = model_dir("minilm") / "all-MiniLM-L6-v2.onnx"  # shared with bench_compare_minilm
    if not path.is_file():
        minilm.export(folder, path)
    feeds = minilm.tokenize(folder)
    return path, {name: array[:, None, :] for name, array in feeds.items()}


def minilm_task(result, calibration: dict) -> dict:
    """The smallest cosine of a sentence embedding to the original's (all 20 sentences at once)."""
    from dehm_onnx.ops.library import make_session

    feeds = {name: array[:, 0, :] for name, array in calibration.items()}

    def embeddings(path):
        session = make_session(path, kernel="if_needed", quiet=True)
        e = session.run(["embedding"], feeds)[0].astype(np.float64)
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    reference = embeddings(result.models["original"])
    column = {label: float(np.min(np.sum(embeddings(path) * reference, axis=1))) for label, path in result.models.items()}
    return {"min sentence cosine": column}


ALL_EMITS = tuple(EMIT_MODES)


def emits(*modes: str) -> tuple:
    """``modes``, after optimize's per-layer ``auto`` emission where this dehm_onnx has one."""
    return (("auto",) if "auto" in EMIT_MODES else ()) + tuple(m for m in modes if m in EMIT_MODES)


# One emission mode where every dehm row costs minutes: optimize's per-layer choice, else function.
ONE_EMIT = ("auto",) if "auto" in EMIT_MODES else ("function",)


CASES = {
    "log4096": Case("1-D log-kernel layer, 4096 x 4096", make_log4096, (1e-4, 1e-3, 1e-2), emits("function", "custom")),
    "gauss1024": Case("Gaussian random layer, 1024 x 1024", make_gauss1024, (1e-2, 5e-2, 1e-1), emits("function", "custom")),
    # issue 13's speed target: at tol 1e-2 within 1.25x of nbits8's batch-1 latency
    "gauss4096": Case("Gaussian random layer, 4096 x 4096", make_gauss4096, (1e-2,), emits("function", "custom")),
    "demo": Case("demo model (models/make_demo.py)", make_demo, (1e-3, 1e-2, 1e-1), ALL_EMITS),
    "whisper128": Case("onnx-asr whisper128 preprocessor, 10 s", _asr("whisper128"), (1e-4, 1e-3, 1e-2), ALL_EMITS),
    "nemo128": Case("onnx-asr nemo128 preprocessor, 10 s", _asr("nemo128"), (1e-4, 1e-3, 1e-2), ALL_EMITS),
    "kaldi": Case("onnx-asr kaldi preprocessor, 10 s", _asr("kaldi"), (1e-4, 1e-3, 1e-2), ALL_EMITS),
    # float storage cannot compress these weights (DESIGN.md section 3); each dehm row costs minutes
    "minilm": Case("all-MiniLM-L6-v2, mean-pooled sentence embeddings", make_minilm, (1e-2, 5e-2), ONE_EMIT, minilm_task, ("auto",)),
    "gp_mean": Case("GP posterior mean, 2048 x 1024", make_gp_mean, (1e-4, 1e-3, 1e-2), ONE_EMIT),
}


def has_precision() -> bool:
    """Whether this dehm_onnx's optimize has a ``precision`` option (quantized emission)."""
    return "precision" in {f.name for f in dataclasses.fields(OptimizeConfig)}


def _commit() -> str:
    proc = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() or "unknown"


def _options(args, case: Case) -> str:
    """The options of this run that change a model's rows (those the model itself fixes left out)."""
    precisions = None if case.precisions or not has_precision() else args.precisions
    given = [("--tols", args.tols), ("--precisions", precisions), ("--emits", args.emits)]
    return "".join(f" {flag} {' '.join(str(v) for v in values)}" for flag, values in given if values)


def run_case(name: str, case: Case, args) -> str:
    """Compare one model; write its JSON, plot and Markdown section; return the section."""
    start = time.perf_counter()
    path, calibration = case.make()
    precisions = (case.precisions or args.precisions) if has_precision() else None
    result = compare(
        path,
        tols=args.tols or case.tols,
        methods=METHODS,
        precisions=precisions,
        emits=args.emits or case.emits,
        accuracy_levels=ACCURACY_LEVELS,
        calibration=calibration,
        rounds=args.rounds,
        stock_latency=True,
        workdir=model_dir(f"pareto_{name}"),
    )
    task = case.task(result, calibration) if case.task else {}
    extra = {header: {label: f"{value:.6f}" for label, value in column.items()} for header, column in task.items()}
    DOCS.mkdir(parents=True, exist_ok=True)
    document = result.to_dict() | ({"task": task} if task else {})
    (DOCS / f"pareto_{name}.json").write_text(json.dumps(document, indent=2) + "\n")
    write_plot(result, DOCS / f"pareto_{name}.png", title=case.title)
    seconds = time.perf_counter() - start
    kernels = "\n".join(f"- `{label}`: {text}" for label, text in result.kernels.items())
    section = (
        f"**{case.title}** (`python benchmarks/bench_pareto.py --models {name}{_options(args, case)}`, commit `{_commit()}`, "
        f"dehm precision option: {'yes' if has_precision() else 'no (float storage)'}; "
        f"`docs/compare/pareto_{name}.json`; {seconds:.0f} s)\n\n{pareto_table(result, extra)}\n\n"
        f"What stock onnxruntime runs for the products (its optimized graph):\n\n{kernels}\n"
    )
    (DOCS / f"pareto_{name}.md").write_text(section)
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--tols", type=float, nargs="+", default=None, help="dehm tols (default: per model)")
    parser.add_argument("--precisions", nargs="+", default=["auto", "float"], help="dehm precisions, once optimize has them")
    parser.add_argument("--emits", nargs="+", default=None, choices=list(EMIT_MODES), help="dehm emission modes (default: per model)")
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args()
    for name in args.models:
        print(f"\n{run_case(name, CASES[name], args)}", flush=True)
    sections = [(DOCS / f"pareto_{name}.md").read_text() for name in CASES if (DOCS / f"pareto_{name}.md").is_file()]
    (DOCS / "pareto.md").write_text("# Pareto tables (written by benchmarks/bench_pareto.py)\n\n" + "\n".join(sections))
    print(f"wrote {(DOCS / 'pareto.md').relative_to(ROOT)} ({len(sections)} models)")


if __name__ == "__main__":
    main()
