"""Peak memory, time and throughput of ``optimize`` on a generated 2.25 GiB external-data model.

Run by hand:  python benchmarks/bench_big_model.py [--layers 36] [--size 4096] [--jobs 0] [--paths verified no-verify]

The model has ``--layers`` parallel ``MatMul(x, W_i) -> y_i`` layers with float32 ``size x size``
weights, all in one external data file (36 x 4096 x 4096 x 4 B = 2.25 GiB, more than protobuf's
2 GB limit). Each ``--jobs`` value is run on each of ``--paths``: ``verified`` is the default
(every layer checked on calibration samples and the graph outputs end to end, the weights
memory-mapped by onnxruntime), ``no-verify`` adds ``--no-verify``. Most weights are smooth kernels (exp, Cauchy, log of sorted random points, a
different length scale each), which compress; ``--random-layers`` of them are Gaussian, which
do not (they are copied to the output unchanged). The model is written once into a cache folder
(``$DEHM_CACHE`` or ``~/.cache/dehm_onnx``, ``bench_big/``) and reused.

``python -m dehm_onnx optimize`` runs as the child of a fresh, small Python parent (so no
process inherits this script's memory), while this script samples the resident memory of the
tree every 50 ms from ``/proc``: the sum of RSS over the main process and its workers (counts
shared pages once per process), the sum of PSS (shared pages split between the processes
sharing them: the memory really used), and the largest single process: the larger of the
sampled value and the parent's ``ru_maxrss`` of its waited-for descendants. Then every layer of
the output is checked against its certified bound with onnxruntime: ``||x W_i - x W_H||_F <=
||x||_2 ||W_i - W_H||_F``. Prints a Markdown table and the time extrapolated to 7B parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL_NAME = "big.onnx"
SEVEN_B = 7e9


def cache_folder() -> Path:
    base = Path(os.environ.get("DEHM_CACHE", Path.home() / ".cache" / "dehm_onnx"))
    return base / "bench_big"


def make_weight(i: int, n: int, random_layer: bool) -> np.ndarray:
    """Layer ``i``'s weight: a smooth kernel (three families in turn) or a Gaussian matrix."""
    rng = np.random.default_rng(1000 + i)
    if random_layer:
        return (rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32)
    s, t = np.sort(rng.random(n)), np.sort(rng.random(n))
    d = np.abs(s[:, None] - t[None, :])
    scale = 0.05 + 0.45 * rng.random()
    family = i % 3
    if family == 0:
        w = np.exp(-d / scale)
    elif family == 1:
        w = 1.0 / (1.0 + (d / scale) ** 2)
    else:
        w = np.log(d + 1e-3 * scale)
    return (w / np.sqrt(n)).astype(np.float32)


def generate(folder: Path, layers: int, n: int, random_layers: int) -> Path:
    """Write the model and its data file one weight at a time (memory: one weight)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MODEL_NAME
    spec = {"layers": layers, "n": n, "random_layers": random_layers, "version": 1}
    stamp = folder / "spec.json"
    if path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == spec:
        return path
    data_name = f"{MODEL_NAME}.data"
    nodes, inits, outputs = [], [], []
    offset = 0
    with open(folder / data_name, "wb") as data:
        for i in range(layers):
            w = make_weight(i, n, i >= layers - random_layers)
            data.write(w.tobytes())
            tensor = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[n, n])
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(w.nbytes))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += w.nbytes
            inits.append(tensor)
            nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"fc{i}"))
            outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["B", n]))
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", n])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    stamp.write_text(json.dumps(spec))
    return path


def _tree(pid: int) -> list[int]:
    pids, stack = [], [pid]
    while stack:
        p = stack.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return pids


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _pss(pid: int) -> int:
    """Proportional set size: shared pages (libraries, forked memory) split between sharers."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# A fresh parent: runs the command, waits, prints the largest descendant's peak RSS (ru_maxrss).
_PARENT = (
    "import resource, subprocess, sys; "
    "code = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(code)"
)


def run_optimize(model: Path, out: Path, jobs: int, tol: float, verify: bool) -> dict:
    """Run the CLI under a fresh small parent; sample the RSS and PSS of the process tree."""
    cmd = [sys.executable, "-m", "dehm_onnx", "optimize", str(model), str(out), "--tol", str(tol),
           "--jobs", str(jobs), "--quiet", "--report", str(out.with_suffix(".json"))]
    if not verify:
        cmd.append("--no-verify")
    peak = {"tree": 0, "pss": 0, "one": 0}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _PARENT, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)

    def sample() -> None:
        while proc.poll() is None:
            pids = _tree(proc.pid)[1:]  # the parent itself is not part of optimize
            rss = [_rss(p) for p in pids]
            peak["tree"] = max(peak["tree"], sum(rss))
            peak["one"] = max([peak["one"], *rss])
            peak["pss"] = max(peak["pss"], sum(_pss(p) for p in pids))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"optimize failed ({proc.returncode}): {stderr.strip()}")
    single = max(peak["one"], int(stdout.strip().splitlines()[-1]))
    return {"wall_s": wall, "peak_tree_rss": peak["tree"], "peak_tree_pss": peak["pss"], "peak_process_rss": single,
            "command": " ".join(cmd)}


def load_average() -> str:
    """The 1, 5 and 15 minute load averages and the core count: how busy the machine was."""
    try:
        one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        return "unknown"
    return f"load average {one}, {five}, {fifteen} on {os.cpu_count()} cores"


def check_bounds(model: Path, out: Path, n: int, batch: int = 8) -> tuple[int, float]:
    """Run the output in onnxruntime; every layer must meet its certified output bound."""
    import onnxruntime as ort

    from dehm_onnx.report import read_layers

    layers = {entry["output"]: entry for entry in read_layers(onnx.load(out, load_external_data=False))}
    x = np.random.default_rng(0).standard_normal((batch, n)).astype(np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, {"x": x})))
    data = np.memmap(model.with_name(f"{MODEL_NAME}.data"), dtype="<f4", mode="r")
    worst = 0.0
    x64 = x.astype(np.float64)
    for i, name in enumerate(names):
        w = np.asarray(data[i * n * n : (i + 1) * n * n], dtype=np.float64).reshape(n, n)
        exact = x64 @ w
        err = np.linalg.norm(got[name] - exact)
        if name in layers:
            cert = layers[name]["rel_certified_error"] * np.linalg.norm(w)
            rounding = 4 * n * np.finfo(np.float32).eps * np.linalg.norm(np.abs(x64) @ np.abs(w))
            bound = np.linalg.norm(x64, 2) * cert + rounding
            if err > bound:
                raise SystemExit(f"layer {name}: output error {err:.3e} > bound {bound:.3e}")
        worst = max(worst, float(err / np.linalg.norm(exact)))
    return len(layers), worst


def time_one_matrix(model: Path, index: int, n: int, tol: float) -> tuple[float, float]:
    """Seconds and stored/dense ratio of ``compress`` on layer ``index`` (one process, one BLAS thread)."""
    from dehm_onnx.hmatrix import compress
    from dehm_onnx.compression.parallel import single_blas_thread

    data = np.memmap(model.with_name(f"{MODEL_NAME}.data"), dtype="<f4", mode="r", offset=index * n * n * 4, shape=(n, n))
    with single_blas_thread():
        start = time.perf_counter()
        hm = compress(data, tol, seed=0)
        seconds = time.perf_counter() - start
    return seconds, hm.params / hm.dense_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--random-layers", type=int, default=2)
    parser.add_argument("--jobs", type=int, nargs="+", default=[0], help="one run per value; 0 = all cores")
    parser.add_argument("--paths", nargs="+", default=["verified", "no-verify"], choices=["verified", "no-verify"],
                        help="the default (verified) run, the --no-verify run, or both")
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--folder", type=Path, default=None, help="where the model is generated")
    args = parser.parse_args()

    folder = args.folder or cache_folder()
    model_bytes = args.layers * args.size * args.size * 4
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    have = (folder / f"{MODEL_NAME}.data").stat().st_size if (folder / f"{MODEL_NAME}.data").exists() else 0
    if free + have < 1.5 * model_bytes:
        raise SystemExit(f"need {1.5 * model_bytes / 1e9:.1f} GB free in {folder}, have {free / 1e9:.1f} GB")

    start = time.perf_counter()
    model = generate(folder, args.layers, args.size, args.random_layers)
    generated = time.perf_counter() - start
    from dehm_onnx.compression.parallel import resolve_jobs

    out = folder / "big.opt.onnx"
    params = args.layers * args.size * args.size
    rows, commands, per_matrix = [], [], {}
    for requested in args.jobs:
        for path_name in args.paths:
            before_load = load_average()
            result = run_optimize(model, out, requested, args.tol, verify=path_name == "verified")
            compressed, worst = check_bounds(model, out, args.size)
            report = json.loads(out.with_suffix(".json").read_text())
            verification = report.get("verification") or {}
            verified = "yes" if verification.get("performed") else "no"
            out_bytes = out.stat().st_size + sum(p.stat().st_size for p in folder.glob("big.opt.onnx.data"))
            jobs = resolve_jobs(requested)
            per_matrix[jobs] = result["wall_s"] / args.layers
            commands.append(f"{result['command']}  ({before_load} before, {load_average()} after)")
            rows.append(
                f"| {model_bytes / 2**30:.2f} GiB float32 | {path_name} ({verified}) | {args.layers} x {args.size}x{args.size} "
                f"| {jobs} | {result['wall_s']:.0f} s | {params / result['wall_s'] / 1e6:.1f} M "
                f"| {result['peak_tree_rss'] / 2**30:.2f} GiB ({result['peak_tree_rss'] / model_bytes:.2f}) "
                f"| {result['peak_tree_pss'] / 2**30:.2f} GiB ({result['peak_tree_pss'] / model_bytes:.2f}) "
                f"| {result['peak_process_rss'] / 2**30:.2f} GiB ({result['peak_process_rss'] / model_bytes:.2f}) "
                f"| {out_bytes / 2**30:.3f} GiB | {compressed} of {args.layers} | {worst:.1e} |"
            )
    for command in commands:
        print(f"command: {command}")
    print(f"(model generated or reused in {generated:.0f} s; {folder})\n")
    print("| model | path (verification performed) | layers | jobs | wall time | params/s | peak RSS, process tree (/ model) "
          "| peak PSS, process tree (/ model) | peak RSS, largest process (/ model) | output size | compressed layers "
          "| worst rel. output error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    jobs, seconds = max(per_matrix.items())
    print(
        f"\n7B parameters = {SEVEN_B / (args.size * args.size):.0f} matrices of {args.size}x{args.size}: "
        f"about {SEVEN_B / params * seconds * args.layers / 3600:.1f} h at the measured {seconds:.1f} s per matrix "
        f"(wall, {jobs} jobs, this machine)."
    )
    print(f"totals from the report: {json.dumps(report.get('totals', {}))}")
    print("\nOne matrix, one process, one BLAS thread (what one worker does per layer):\n")
    print("| matrix | compress() time | stored/dense | 7B parameters' worth, serial | same with all cores |")
    print("|---|---|---|---|---|")
    kinds = [("smooth kernel (layer 0)", 0)]
    if args.random_layers:
        kinds.append(("Gaussian, incompressible (last layer)", args.layers - 1))
    for label, index in kinds:
        seconds, ratio = time_one_matrix(model, index, args.size, args.tol)
        serial = SEVEN_B / (args.size * args.size) * seconds / 3600
        print(f"| {label} | {seconds:.1f} s | {ratio:.3f} | {serial:.1f} h | {serial / jobs:.1f} h ({jobs} cores) |")


if __name__ == "__main__":
    main()
