"""The plugin as napari sees it: a valid manifest, discovered through the entry point, loadable in a viewer."""
from __future__ import annotations

import subprocess
import sys

import npe2


def test_manifest_validates_with_npe2_cli():
    result = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", "napari-dmoe"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in (result.stdout + result.stderr).lower()


def test_plugin_is_discovered_by_entry_point():
    pm = npe2.PluginManager.instance()
    pm.discover()
    assert "napari-dmoe" in pm._manifests or "napari-dmoe" in {m.name for m in pm.iter_manifests()}
    manifest = pm.get_manifest("napari-dmoe")
    # every command in the manifest resolves to a real Python object
    for command in manifest.contributions.commands or []:
        assert command.python_name, command.id
        module, _, attr = command.python_name.partition(":")
        obj = __import__(module, fromlist=[attr.split(".")[0]])
        for part in attr.split("."):
            obj = getattr(obj, part)
        assert callable(obj), command.python_name


def test_core_imports_without_qt_or_napari():
    code = (
        "import sys\n"
        "import napari_dmoe, napari_dmoe.model.spec\n"
        "import importlib\n"
        "for m in ['napari_dmoe.model', 'napari_dmoe.io.checkpoint', 'napari_dmoe.inference.engine', 'napari_dmoe.evaluation.metrics', 'napari_dmoe.evaluation.report',\n"
        "          'napari_dmoe.datasets', 'napari_dmoe.training', 'napari_dmoe.cli.main']:\n"
        "    importlib.import_module(m)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in {'PyQt5', 'PySide2', 'PySide6', 'PyQt6', 'qtpy', 'napari'})\n"
        "print(bad)\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_package_import_is_light():
    """Importing the package (what napari does to build its menus) must not import torch."""
    code = "import sys, napari_dmoe; assert 'torch' not in sys.modules, 'torch imported eagerly'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
