"""Declared dependencies equal imported ones: pyproject's lists against the imports of napari_dmoe (ast).

The core (``dependencies``) is what every module outside plugin/ and the HTTP server imports; the ``napari``
extra is what plugin/ adds; the ``server`` extra what ``dmoe serve`` adds. Two packages are declared without
being imported, each for a reason given in ``NOT_IMPORTED``.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip's vendored tomli is the same parser
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "napari_dmoe"
# import name -> distribution name, where they differ
DISTRIBUTION = {"yaml": "pyyaml", "PIL": "pillow", "skimage": "scikit-image"}
# declared, never imported: why
NOT_IMPORTED = {
    "einops": "core: MONAI's transformer blocks (TransUNet's ViT) load it at run time",
    "npe2": "napari: napari's plugin engine reads our napari.yaml manifest",
}


def _extra_of(path: Path) -> str:
    """Which dependency list a module's imports belong to."""
    rel = path.relative_to(PACKAGE).as_posix()
    if rel.startswith("plugin/"):
        return "napari"
    if rel.startswith("server/") or rel == "cli/serve.py":
        return "server"
    return "core"


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imported() -> dict[str, set[str]]:
    """Third-party distributions imported (anywhere in the file, lazy imports too), per dependency list."""
    std = set(sys.stdlib_module_names)
    out: dict[str, set[str]] = {"core": set(), "napari": set(), "server": set()}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in std and top not in ("napari_dmoe", "__future__"):
                    out[_extra_of(path)].add(_name(DISTRIBUTION.get(top, top)))
    return out


def _declared() -> dict[str, set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    return {"core": {_name(r) for r in project["dependencies"]}, "napari": {_name(r) for r in extras["napari"]},
            "server": {_name(r) for r in extras["server"]}}


def test_core_declares_exactly_what_it_imports():
    imported, declared = _imported(), _declared()
    declared_core = declared["core"] - set(NOT_IMPORTED)
    assert declared_core == imported["core"], (f"imported, not declared: {imported['core'] - declared_core}; "
                                               f"declared, not imported: {declared_core - imported['core']}")


def test_napari_extra_declares_what_the_plugin_adds():
    imported, declared = _imported(), _declared()
    adds = imported["napari"] - declared["core"]
    assert declared["napari"] - set(NOT_IMPORTED) == adds, (f"plugin imports {adds}, extra declares {declared['napari']}")
    assert not declared["napari"] & declared["core"]


def test_server_extra_declares_what_the_server_adds():
    imported, declared = _imported(), _declared()
    assert declared["server"] == imported["server"] - declared["core"]


def test_gui_and_test_extras_build_on_the_napari_extra():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert any(r.startswith("napari-dmoe[") and "napari" in r for r in extras["gui"]) and "pyqt6" in {
        _name(r) for r in extras["gui"]}
    assert any(r.startswith("napari-dmoe[") and "gui" in r for r in extras["test"])


def test_no_qt_or_napari_in_the_core_list():
    core = _declared()["core"]
    assert not core & {"napari", "npe2", "magicgui", "superqt", "qtpy", "pyqt6", "pyqt5", "pyside6"}, core
