"""Guard rails that run on every change (fast lane): module and function sizes, napari-free test collection."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
GUI_PACKAGES = {"napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt", "vispy"}


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def test_modules_and_functions_stay_short():
    too_long = []
    for path in _python_files("napari_dmoe"):
        source = path.read_text(encoding="utf-8")
        rel = path.relative_to(ROOT)
        if source.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{rel}: {source.count(chr(10))} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{rel}:{node.lineno} {node.name}: {length} lines (at most {MAX_FUNCTION_LINES})")
    assert not too_long, "split these along a seam:\n" + "\n".join(too_long)


def test_test_modules_do_not_import_napari_at_module_level():
    """Collecting the suite imports every test module, so a module-level ``import napari`` would load napari even
    under ``-m "not gui"``; import it inside the gui tests (and their fixtures) instead."""
    offenders = []
    for path in _python_files("tests"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in GUI_PACKAGES]
    assert not offenders, offenders


def test_the_not_gui_lane_collects_without_napari():
    """Collecting the whole suite under -m "not gui" loads no napari viewer, layer or Qt binding, and leaves none
    of the viewer tests (the conftest hook marks every test that uses make_napari_viewer). napari's and
    pytest-qt's own pytest plugins load napari.utils and Qt at start-up whatever is selected: not counted."""
    import subprocess
    import sys

    code = ("import sys, pytest; GUI = ('napari.viewer', 'napari.layers', 'napari.components', 'napari._qt', "
            "'qtpy');  rc = pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', '-p', 'no:xvfb', "
            "'-m', 'not gui', sys.argv[1]]); "
            "print('LOADED', sorted(m for m in sys.modules if m.startswith(GUI)))")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "tests")], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert "LOADED []" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "test_widget_segment.py::" not in proc.stdout, "viewer tests left in the not-gui lane"
