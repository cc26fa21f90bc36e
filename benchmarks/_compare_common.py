"""Shared by the bench_compare_*.py scripts: run ``compare``, print and write its table and plot.

Each benchmark writes ``docs/compare/<name>.md``, ``<name>.json`` and ``<name>.png`` (the
tables and plots of docs/compare.md) and keeps every method's model in
``$DEHM_CACHE/compare/<name>/`` (models are never committed).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dehm_onnx.compare import compare, markdown_table, write_json, write_markdown, write_plot  # noqa: E402
from models.fetch import cache_dir  # noqa: E402

DOCS = ROOT / "docs" / "compare"


def model_dir(name: str) -> Path:
    """A cache folder for one benchmark's models."""
    folder = cache_dir() / "compare" / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def run_compare(model_path, name: str, title: str, **kwargs):
    """``compare`` the model, print the Markdown table and write docs/compare/<name>.{md,json,png}."""
    result = compare(model_path, workdir=model_dir(name), **kwargs)
    DOCS.mkdir(parents=True, exist_ok=True)
    write_json(result, DOCS / f"{name}.json")
    write_markdown(result, DOCS / f"{name}.md", title=title)
    write_plot(result, DOCS / f"{name}.png", title=title)
    print(f"\n### {title}\n\ncalibration: {result.calibration}\n")
    print(markdown_table(result))
    return result
