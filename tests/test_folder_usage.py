"""Expert usage over a folder of cases: the Qt-free generator on real PNG files and a real tiny model, and the
routing inspector's "Folder of cases" path on a real viewer."""
from __future__ import annotations

import numpy as np
import pytest
from skimage.io import imsave

from test_widget_segment import left_button, make_image


def write_cases(folder):
    """4 PNGs (one of them corrupt) and a CSV: 2 Black cases, 1 White, the broken one Black."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(["a.png", "b.png", "c.png"]):
        img = make_image((32, 40)) * (1 + i) + i
        imsave(folder / name, ((img - img.min()) / np.ptp(img) * 255).astype(np.uint8), check_contrast=False)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    csv = folder / "cases.csv"
    csv.write_text("image,race\na.png,Black\nb.png,White\nbroken.png,Black\nc.png,Black\n")
    return csv


def drain(gen):
    from napari_dmoe.generators import drain as run

    steps = []
    return steps, run(gen, steps.append)


def test_folder_usage_groups_cases_and_skips_broken_files(tmp_path, model_path):
    from napari_dmoe.io.checkpoint import load_model
    from napari_dmoe.io.images import read_image
    from napari_dmoe.inference.engine import segment
    from napari_dmoe.inference.sweep import expert_usage, iter_folder_usage

    csv = write_cases(tmp_path / "cases")
    model = load_model(model_path)
    steps, result = drain(iter_folder_usage(model, tmp_path / "cases", csv, device="cpu"))
    labels, matrix, counts, errors = result[:4]  # then the per-case records (tests/test_folder_export.py)
    assert labels == ["race=Black", "race=White"]  # vocabulary order
    assert counts == [2, 1] and matrix.shape == (2, 4)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-2)
    assert [name for name, _ in errors] == ["broken.png"] and "broken.png" in errors[0][1]
    assert {s.name for s in steps} >= {"a.png", "b.png", "c.png", "broken.png"}
    assert steps[-1].done == steps[-1].total == 4

    # each row is the mean of its cases' image-mean usage, as the engine computes it case by case
    def usage(name, race):
        seg = segment(model, read_image(tmp_path / "cases" / name).array, race, device="cpu", routing="mean")
        return np.asarray(expert_usage(seg.routing["mean"]))

    np.testing.assert_allclose(matrix[0], (usage("a.png", "Black") + usage("c.png", "Black")) / 2, atol=1e-6)
    np.testing.assert_allclose(matrix[1], usage("b.png", "White"), atol=1e-6)


def test_folder_usage_rejects_bad_input(tmp_path, model_path):
    from napari_dmoe.io.checkpoint import load_model
    from napari_dmoe.inference.sweep import SweepError, iter_folder_usage

    model = load_model(model_path)
    csv = write_cases(tmp_path / "cases")
    with pytest.raises(SweepError, match="not a folder"):
        drain(iter_folder_usage(model, tmp_path / "nowhere", csv))
    bad = tmp_path / "bad.csv"
    bad.write_text("file,race\na.png,Black\n")
    with pytest.raises(ValueError, match="column 'image'"):
        drain(iter_folder_usage(model, tmp_path / "cases", bad))
    bad.write_text("image,race\na.png,Martian\n")
    with pytest.raises(ValueError, match="Martian"):
        drain(iter_folder_usage(model, tmp_path / "cases", bad))
    bad.write_text("image,race\nbroken.png,Black\nmissing.png,White\n")
    with pytest.raises(SweepError, match="none of the 2 cases"):
        drain(iter_folder_usage(model, tmp_path / "cases", bad, device="cpu"))


@pytest.mark.gui
def test_inspector_folder_of_cases(make_napari_viewer, qtbot, tmp_path, model_path):
    from napari.utils.notifications import notification_manager

    from napari_dmoe.io.checkpoint import load_model
    from napari_dmoe.inference.sweep import iter_folder_usage

    csv = write_cases(tmp_path / "cases")
    viewer = make_napari_viewer()
    _, inspector = viewer.window.add_plugin_dock_widget("napari-dmoe", "Routing inspector")
    worker = inspector.inspect_folder(tmp_path / "cases", csv, model_path=model_path, device="cpu")
    assert worker is not None and inspector.folder_button.text() == "Cancel"
    qtbot.waitUntil(lambda: inspector.worker is None, timeout=30000)

    entry = f"folder cases | {model_path.name}"
    assert inspector.groups.currentText() == entry
    labels, matrix = inspector.matrix()
    assert labels == ["race=Black (n=2)", "race=White (n=1)"]
    _, expected = drain(iter_folder_usage(load_model(model_path), tmp_path / "cases", csv, device="cpu"))
    np.testing.assert_allclose(matrix, expected.matrix, atol=1e-6)
    ax = inspector.figure.axes[0]
    np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), matrix)  # drawn, not just computed
    assert [t.get_text() for t in ax.get_yticklabels()] == labels
    assert "Skipped 1: broken.png" in inspector.hint.text()
    assert inspector.folder_button.text() == "Folder of cases..."

    # a bad CSV is reported, never raised; the folder entry drawn before stays
    bad = tmp_path / "bad.csv"
    bad.write_text("file,race\na.png,Black\n")
    start = len(notification_manager.records)
    inspector.inspect_folder(tmp_path / "cases", bad)
    qtbot.waitUntil(lambda: inspector.worker is None, timeout=30000)
    messages = [str(n.message) for n in notification_manager.records[start:]]
    assert any("column 'image'" in m for m in messages)
    assert "column 'image'" in inspector.hint.text()
    assert inspector.matrix()[0] == labels


@pytest.mark.gui
def test_folder_button_asks_for_folder_then_csv(make_napari_viewer, qtbot, monkeypatch, tmp_path):
    from napari_dmoe.plugin.widgets import inspector_widget

    viewer = make_napari_viewer()
    _, inspector = viewer.window.add_plugin_dock_widget("napari-dmoe", "Routing inspector")
    calls = []
    monkeypatch.setattr(inspector, "inspect_folder", lambda folder, csv: calls.append((folder, csv)))
    dialog = inspector_widget.QFileDialog
    monkeypatch.setattr(dialog, "getExistingDirectory", staticmethod(lambda *a, **k: str(tmp_path)))
    monkeypatch.setattr(dialog, "getOpenFileName", staticmethod(lambda *a, **k: ("", "")))
    qtbot.mouseClick(inspector.folder_button, left_button())
    assert calls == []  # CSV dialog cancelled: nothing runs
    monkeypatch.setattr(dialog, "getOpenFileName", staticmethod(lambda *a, **k: (str(tmp_path / "c.csv"), "")))
    qtbot.mouseClick(inspector.folder_button, left_button())
    assert calls == [(str(tmp_path), str(tmp_path / "c.csv"))]
