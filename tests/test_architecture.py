"""The package layout is the architecture: who may import whom, and a core that never needs Qt or napari.

The table below is the one in docs/architecture.md. A new module in a package inherits its row; a new package
needs a row here (the test fails until it has one), which is the moment to decide where it sits.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "napari_dmoe"

# Shared leaves: small modules any layer may use; they import nothing of ours but other leaves.
LEAVES = {"devices", "transforms", "generators", "text", "limits", "client", "colors", "distributed", "sharding",
          "threads"}
CORE = {"model", "io", "datasets", "inference", "evaluation", "training", "finetune", "synthetic"}
# unit -> the units it may import (besides itself, the leaves and the package root's __version__)
ALLOWED: dict[str, set[str]] = {
    **{leaf: set(LEAVES) for leaf in LEAVES},
    "model": set(),
    "io": {"model"},
    "datasets": {"io", "model"},
    "inference": {"io", "model"},
    "evaluation": {"inference", "datasets", "io", "model"},
    "training": {"evaluation", "inference", "datasets", "io", "model"},
    "finetune": {"evaluation", "inference", "datasets", "io", "model", "synthetic"},  # trains via `dmoe train`
    "synthetic": {"io", "model"},
    "server": {"inference", "evaluation", "datasets", "io", "model"},
    "cli": CORE | {"server"},
    # never cli/ or server/ (the plugin calls the engine, not the front ends), never training/ (a GUI fine-tune
    # trains through the `dmoe train` subprocess of finetune/, so napari never holds a training loop)
    "plugin": CORE - {"training"},
}
# Never imported outside plugin/ (the core must install and run without them).
GUI_MODULES = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "superqt", "magicgui", "vispy")


def _unit(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0].removesuffix(".py")


def _our_imports(path: Path) -> set[str]:
    """First-level names under napari_dmoe imported anywhere in the file (lazy imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; write napari_dmoe.<package>.<module>"
            names = [node.module or ""]
            if node.module == "napari_dmoe":  # from napari_dmoe import distributed
                names = [f"napari_dmoe.{a.name}" for a in node.names if a.name != "__version__"]
        else:
            continue
        out |= {n.split(".")[1] for n in names if n.startswith("napari_dmoe.")}
    return out


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts != ("__init__.py",))


def test_every_unit_has_a_row_in_the_table():
    units = {_unit(p) for p in _modules()}
    assert units <= set(ALLOWED), f"add a row to ALLOWED (and docs/architecture.md) for {units - set(ALLOWED)}"


def test_imports_follow_the_table():
    wrong = []
    for path in _modules():
        unit = _unit(path)
        allowed = ALLOWED.get(unit, set()) | {unit} | LEAVES
        for target in _our_imports(path) - allowed:
            wrong.append(f"{path.relative_to(PACKAGE.parent)} imports napari_dmoe.{target}")
    assert not wrong, "imports against the table in docs/architecture.md:\n" + "\n".join(wrong)


def test_no_gui_import_outside_the_plugin():
    wrong = []
    for path in _modules():
        if _unit(path) == "plugin":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            wrong += [f"{path.relative_to(PACKAGE.parent)}: {n}" for n in names if n.split(".")[0] in GUI_MODULES]
    assert not wrong, wrong


BLOCKER = textwrap.dedent("""
    import importlib, importlib.abc, pathlib, sys
    BLOCKED = set(sys.argv[1].split(","))

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"core module imported {name}")
            return None

    sys.meta_path.insert(0, Block())
    root = pathlib.Path(sys.argv[2])
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[1] == "plugin":
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        importlib.import_module(name)
    try:  # the blocker itself works
        import qtpy
    except ImportError:
        print("imported", len([m for m in sys.modules if m.startswith("napari_dmoe")]))
""")


def test_every_core_module_imports_without_qt_or_napari():  # fast lane: it guards every change
    """In a fresh interpreter where napari, Qt and friends cannot be imported at all."""
    proc = subprocess.run([sys.executable, "-c", BLOCKER, ",".join(GUI_MODULES), str(PACKAGE)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "imported" in proc.stdout, proc.stdout
