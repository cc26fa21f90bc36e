"""Compare results for people: a Markdown table and a PNG plot of error against size.

matplotlib is not a dependency of dehm_onnx; ``write_plot`` imports it when called.
"""

from __future__ import annotations

import json

from ..errors import ConfigError
from ..files import atomic_output, write_text

__all__ = ["markdown_table", "write_json", "write_markdown", "write_plot"]

_HEADERS = {
    "method": "method",
    "stored_params": "stored params",
    "file_bytes": "file bytes",
    "output_rel_error": "output rel. L2 error",
    "max_layer_error": "max layer error",
    "latency_ms": "latency ms",
    "optimize_seconds": "optimize s",
}


def _cell(key: str, value) -> str:
    if value is None:
        return "—"
    if key in ("stored_params", "file_bytes"):
        return f"{int(value):,}"
    if key in ("output_rel_error", "max_layer_error"):
        return "0" if value == 0 else f"{value:.2e}"
    if key == "latency_ms":
        return f"{value:.3f}"
    if key == "optimize_seconds":
        return f"{value:.2f}"
    return str(value)


def markdown_table(result) -> str:
    """The rows as a Markdown table, then one line per failed method."""
    from .core import ROW_KEYS

    lines = [
        "| " + " | ".join(_HEADERS[k] for k in ROW_KEYS) + " |",
        "|" + "|".join("---" if k == "method" else "---:" for k in ROW_KEYS) + "|",
    ]
    for row in result.rows:
        lines.append("| " + " | ".join(_cell(k, row[k]) for k in ROW_KEYS) + " |")
    for method, error in result.errors.items():
        lines.append(f"\n{method} failed: {error}")
    return "\n".join(lines)


def write_json(result, path) -> None:
    """Write ``{"rows": [...]}`` (plus ``errors`` when a method failed)."""
    write_text(path, json.dumps(result.to_dict(), indent=2) + "\n")


def write_markdown(result, path, title: str = "") -> None:
    """Write the Markdown table (under ``title`` if given)."""
    head = f"# {title}\n\ncalibration: {result.calibration}\n\n" if title else ""
    write_text(path, head + markdown_table(result) + "\n")


def _family(method: str) -> str:
    return method.split("@", 1)[0]


def write_plot(result, path, title: str = "") -> None:
    """Write a PNG: output error against stored parameters and against file bytes (log axes).

    Zero errors cannot sit on a log axis; they are drawn at the bottom edge and labelled 0.

    Raises:
        ConfigError: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ConfigError("--plot needs matplotlib: pip install matplotlib") from e
    rows = [r for r in result.rows if r["output_rel_error"] is not None]
    positive = [r["output_rel_error"] for r in rows if r["output_rel_error"] > 0]
    floor = min(positive) / 10 if positive else 1e-8
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    markers = {"original": "*", "dehm": "o", "svd": "s", "pruning": "^", "int8": "D", "int4": "v"}
    for ax, size_key, label in ((axes[0], "stored_params", "stored parameters"), (axes[1], "file_bytes", "file bytes")):
        for family in dict.fromkeys(_family(r["method"]) for r in rows):
            group = [r for r in rows if _family(r["method"]) == family]
            xs = [r[size_key] for r in group]
            ys = [max(r["output_rel_error"], floor) for r in group]
            ax.plot(xs, ys, marker=markers.get(family, "x"), markerfacecolor="none", markersize=8,
                    linestyle="-" if len(group) > 1 else "", label=family)
            for r, x, y in zip(group, xs, ys):
                text = r["method"].split("@", 1)[1] if "@" in r["method"] else ("0" if r["output_rel_error"] == 0 else "")
                if text:
                    ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("output relative L2 error")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        with atomic_output(path) as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)
