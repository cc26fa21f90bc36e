"""The package's imports run one way: no module imports from a layer above its own.

Layers, lowest first (README "Layout" says the same):

====  ==========================================================================
0     ``errors``, ``files`` (and the package ``__init__``: ``__version__`` and lazy names)
1     ``hmatrix`` — numpy/scipy only
2     ``compression``, ``config``, ``report``, ``progress`` — no onnx
3     ``graph``, ``model_io``, ``model_check``, ``ops`` — onnx and onnx-ir
4     ``verify`` — onnxruntime
5     ``api``, ``compare``
6     ``commands``, ``cli``, ``__main__``
====  ==========================================================================

Imports inside functions count too: a lazy import is still an arrow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dehm_onnx"
LAYERS = {
    "": 0, "errors": 0, "files": 0,
    "hmatrix": 1,
    "compression": 2, "config": 2, "report": 2, "progress": 2,
    "graph": 3, "model_io": 3, "model_check": 3, "ops": 3,
    "verify": 4,
    "api": 5, "compare": 5,
    "commands": 6, "cli": 6, "__main__": 6,
}


def _module(path: Path) -> list[str]:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _layer(parts: list[str]) -> int:
    top = parts[0] if parts else ""
    assert top in LAYERS, f"module dehm_onnx.{'.'.join(parts)} has no layer: add it to LAYERS and the README"
    return LAYERS[top]


def _imported(path: Path):
    """``(line, module parts)`` of every import of a dehm_onnx module in ``path``."""
    package = _module(path) if path.name == "__init__.py" else _module(path)[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "dehm_onnx":
                target = node.module.split(".")[1:]
            else:
                continue
            names = [alias.name for alias in node.names]
            # ``from . import x`` imports the module x when x is one.
            if not node.module and names and (PACKAGE.joinpath(*target, names[0]).exists() or PACKAGE.joinpath(*target, names[0] + ".py").exists()):
                target = target + [names[0]]
            yield node.lineno, target
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "dehm_onnx":
                    yield node.lineno, alias.name.split(".")[1:]


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(PACKAGE)) for p in MODULES])
def test_no_import_from_a_higher_layer(path):
    if path.name == "__init__.py" and path.parent == PACKAGE:
        return  # the facade: names resolved lazily, on first use
    own = _layer(_module(path))
    upward = [(line, ".".join(t)) for line, t in _imported(path) if _layer(t) > own]
    assert not upward, f"dehm_onnx.{'.'.join(_module(path))} (layer {own}) imports from higher layers: {upward}"


def test_every_top_level_module_has_a_layer():
    tops = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in MODULES if p.name != "py.typed"}
    assert tops - {"__init__"} <= set(LAYERS)


def test_hmatrix_and_compression_never_import_onnx():
    for path in [*PACKAGE.joinpath("hmatrix").rglob("*.py"), *PACKAGE.joinpath("compression").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level]
        assert not [n for n in names if n.split(".")[0] in ("onnx", "onnx_ir", "onnxruntime")], path
