"""Compare results for people: Markdown tables and a PNG Pareto plot of error against bytes.

matplotlib is not a dependency of dehm_onnx; ``write_plot`` imports it when called.
"""

from __future__ import annotations

import json
import math

from ..errors import ConfigError
from ..files import atomic_output, write_text

__all__ = ["markdown_table", "pareto_table", "kernel_notes", "write_json", "write_markdown", "write_plot"]

_HEADERS = {
    "method": "method",
    "stored_params": "stored params",
    "file_bytes": "file bytes",
    "file_ratio": "file ratio",
    "output_rel_error": "output rel. L2 error",
    "output_max_abs": "output max abs error",
    "output_cosine": "output cosine",
    "max_layer_error": "max layer error",
    "latency_ms": "latency ms",
    "optimize_seconds": "optimize s",
    "pareto": "Pareto",
}


def _cell(key: str, value) -> str:
    if value is None:
        return "—"
    if key in ("stored_params", "file_bytes"):
        return f"{int(value):,}"
    if key == "file_ratio":
        return f"{value:.4f}"
    if key in ("output_rel_error", "output_max_abs", "max_layer_error"):
        return "0" if value == 0 else f"{value:.2e}"
    if key == "output_cosine":
        return f"{value:.6f}"
    if key == "latency_ms":
        return f"{value:.3f}"
    if key == "optimize_seconds":
        return f"{value:.2f}"
    if key == "pareto":
        return "yes" if value else "no"
    return str(value)


def markdown_table(result) -> str:
    """The rows as a Markdown table, what stock onnxruntime runs, then one line per failed method."""
    from .core import ROW_KEYS

    lines = [
        "| " + " | ".join(_HEADERS[k] for k in ROW_KEYS) + " |",
        "|" + "|".join("---" if k == "method" else "---:" for k in ROW_KEYS) + "|",
    ]
    for row in result.rows:
        lines.append("| " + " | ".join(_cell(k, row[k]) for k in ROW_KEYS) + " |")
    notes = kernel_notes(result)
    if notes:
        lines.append("\nstock onnxruntime runs: " + "; ".join(notes))
    for method, error in result.errors.items():
        lines.append(f"\n{method} failed: {error}")
    return "\n".join(lines)


def kernel_notes(result) -> list[str]:
    """``label: kernels`` for the original and every row whose stock kernels differ from it."""
    base = result.kernels.get("original")
    notes = [f"original: {base}"] if base is not None else []
    notes += [f"{label}: {kernels}" for label, kernels in result.kernels.items() if label != "original" and kernels != base]
    return notes


def _ratio(value, base) -> str:
    if value is None or not base:
        return "—"
    return f"{value / base:.2f}×"


def pareto_table(result, extra: dict | None = None) -> str:
    """The Pareto view as a Markdown table: bytes and latency relative to the original.

    Columns: method, file bytes (fraction of the original file), output rel. L2 error, max
    abs error, cosine, latency (ms and relative to the original's, same alternating run),
    Pareto. ``extra`` adds columns: ``{header: {row method: text}}`` (e.g. a task metric).
    """
    extra = extra or {}
    base_latency = next((r["latency_ms"] for r in result.rows if r["method"] == "original"), None)
    headers = ["method", "file bytes (× original)", "output rel. L2", "max abs", "cosine", *extra, "latency ms", "latency × original", "Pareto"]
    lines = ["| " + " | ".join(headers) + " |", "|---|" + "---:|" * (len(headers) - 1)]
    for row in result.rows:
        label = row["method"]
        cells = [
            label,
            _cell("file_ratio", row["file_ratio"]),
            _cell("output_rel_error", row["output_rel_error"]),
            _cell("output_max_abs", row["output_max_abs"]),
            _cell("output_cosine", row["output_cosine"]),
            *(column.get(label, "—") for column in extra.values()),
            _cell("latency_ms", row["latency_ms"]),
            _ratio(row["latency_ms"], base_latency),
            "**yes**" if row["pareto"] else _cell("pareto", row["pareto"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for method, error in result.errors.items():
        lines.append(f"\n{method} failed: {error}")
    return "\n".join(lines)


def write_json(result, path) -> None:
    """Write ``result.to_dict()``: rows (with their ``pareto`` flags), outputs, kernels, errors."""
    write_text(path, json.dumps(result.to_dict(), indent=2) + "\n")


def write_markdown(result, path, title: str = "") -> None:
    """Write the Markdown table (under ``title`` if given)."""
    head = f"# {title}\n\ncalibration: {result.calibration}\n\n" if title else ""
    write_text(path, head + markdown_table(result) + "\n")


def _family(method: str) -> str:
    return method.split("@", 1)[0]


_MARKERS = {"original": "*", "dehm": "o", "svd": "s", "pruning": "^", "int8": "D", "nbits4": "v", "nbits8": "P"}


def _marker(family: str) -> str:
    return _MARKERS.get(family.split("-", 1)[0], "x")


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def write_plot(result, path, title: str = "") -> None:
    """Write a PNG: output error (log) against file bytes, the Pareto points filled and joined,
    and output error against latency.

    Zero errors cannot sit on a log axis; they are drawn at the bottom edge and labelled 0.
    Rows whose error is NaN or infinite are left out (the tables show them).

    Raises:
        ConfigError: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ConfigError("--plot needs matplotlib: pip install matplotlib") from e
    rows = [r for r in result.rows if _finite(r["output_rel_error"]) and r["file_bytes"] is not None]
    positive = [r["output_rel_error"] for r in rows if r["output_rel_error"] > 0]
    floor = min(positive) / 10 if positive else 1e-8
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    colors = {}
    for ax, size_key, label in ((axes[0], "file_bytes", "file bytes"), (axes[1], "latency_ms", "latency ms (batch 1)")):
        for family in dict.fromkeys(_family(r["method"]) for r in rows):
            group = [r for r in rows if _family(r["method"]) == family and r[size_key] is not None]
            if not group:
                continue
            xs = [r[size_key] for r in group]
            ys = [max(r["output_rel_error"], floor) for r in group]
            line = ax.plot(xs, ys, marker=_marker(family), markerfacecolor="none", markersize=8,
                           linestyle="-" if len(group) > 1 else "", label=family, color=colors.get(family))
            colors[family] = line[0].get_color()
            front = [(x, y) for r, x, y in zip(group, xs, ys) if r["pareto"]]
            if front:  # the points no other row beats (on bytes and error): filled
                ax.plot(*zip(*front), marker=_marker(family), linestyle="", markersize=8, color=colors[family])
            for r, x, y in zip(group, xs, ys):
                text = r["method"].split("@", 1)[1] if "@" in r["method"] else ("0" if r["output_rel_error"] == 0 else "")
                if text:
                    ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("output relative L2 error")
        ax.grid(True, which="both", alpha=0.3)
    front = sorted((r["file_bytes"], max(r["output_rel_error"], floor)) for r in rows if r["pareto"])
    if front:
        axes[0].step(*zip(*front), where="post", color="grey", alpha=0.5, linewidth=1, label="Pareto front")
    axes[0].set_title("filled: no other method is smaller and more accurate", fontsize=9)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        with atomic_output(path) as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)
