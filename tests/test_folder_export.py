"""Per-case CSV export of a folder-of-cases run: the Qt-free writer on a real folder run, and the inspector's
"Export CSV..." button on a real viewer."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from test_folder_usage import drain, write_cases
from test_widget_segment import left_button

EXPERTS = [f"expert_{e}" for e in range(4)]


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_csv_has_one_row_per_case_with_router_usage_and_skips(tmp_path, model_path):
    from napari_dmoe.io.checkpoint import load_model
    from napari_dmoe.inference.sweep import SweepError, iter_folder_usage, write_folder_csv

    write_cases(tmp_path / "cases")
    cases = tmp_path / "cases" / "with_unknown.csv"  # the standard cases plus one without an attribute value
    cases.write_text("image,race\na.png,Black\nb.png,White\nbroken.png,Black\nc.png,Black\na.png,\n")
    _, result = drain(iter_folder_usage(load_model(model_path), tmp_path / "cases", cases, device="cpu"))
    out = write_folder_csv(result, tmp_path / "usage.csv")
    header, rows = read_rows(out)
    assert header == ["case", "race", "router", "attribute_used", *EXPERTS, "status", "reason", "model"]
    assert [r["case"] for r in rows] == ["a.png", "b.png", "broken.png", "c.png", "a.png"]  # CSV order
    assert [r["race"] for r in rows] == ["Black", "White", "Black", "Black", "unknown"]
    assert [r["router"] for r in rows] == ["1", "2", "", "1", "0 1 2"]  # vocabulary Asian, Black, White
    assert [r["status"] for r in rows] == ["ok", "ok", "skipped", "ok", "ok"]
    assert rows[0]["attribute_used"] == "race=Black" and rows[4]["attribute_used"] == "race=unknown (averaged over 3 values)"
    assert all(r["model"] == str(model_path) for r in rows)

    ok = [r for r in rows if r["status"] == "ok"]
    usage = np.array([[float(r[e]) for e in EXPERTS] for r in ok])
    np.testing.assert_allclose(usage.sum(axis=1), 1.0, atol=1e-2)  # gate weights sum to 1 per pixel
    # the group rows of the inspector are the means of these per-case rows
    np.testing.assert_allclose(usage[[0, 2]].mean(axis=0), result.matrix[0], atol=1e-5)  # race=Black
    np.testing.assert_allclose(usage[1], result.matrix[1], atol=1e-5)  # race=White
    np.testing.assert_allclose(usage[3], result.matrix[2], atol=1e-5)  # unknown
    assert not np.allclose(usage[0], usage[1])
    broken = rows[2]
    assert "broken.png" in broken["reason"] and all(broken[e] == "" for e in EXPERTS)

    with pytest.raises(SweepError, match="is a folder"):
        write_folder_csv(result, tmp_path)
    with pytest.raises(SweepError, match="does not exist"):
        write_folder_csv(result, tmp_path / "missing" / "usage.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cases", "usage.csv"]  # no temp files left


@pytest.mark.gui
def test_inspector_exports_the_folder_shown(make_napari_viewer, qtbot, monkeypatch, tmp_path, model_path):
    from napari.utils.notifications import notification_manager

    from napari_dmoe.plugin.widgets import inspector_widget

    csv_path = write_cases(tmp_path / "cases")
    viewer = make_napari_viewer()
    _, inspector = viewer.window.add_plugin_dock_widget("napari-dmoe", "Routing inspector")
    assert not inspector.export_button.isEnabled()  # nothing to export yet
    inspector.inspect_folder(tmp_path / "cases", csv_path, model_path=model_path, device="cpu")
    qtbot.waitUntil(lambda: inspector.worker is None, timeout=30000)
    assert inspector.export_button.isEnabled()

    asked = []
    target = tmp_path / "out" / "usage"  # no extension: the widget adds .csv
    target.parent.mkdir()

    def save_dialog(parent, caption, directory, filters):
        asked.append(directory)
        return str(target), "CSV files (*.csv)"

    monkeypatch.setattr(inspector_widget.QFileDialog, "getSaveFileName", staticmethod(save_dialog))
    qtbot.mouseClick(inspector.export_button, left_button())
    assert asked == [str(tmp_path / "cases" / "cases_expert_usage.csv")]  # suggested beside the cases
    header, rows = read_rows(target.with_suffix(".csv"))
    assert [r["case"] for r in rows] == ["a.png", "b.png", "broken.png", "c.png"]
    assert [r["status"] for r in rows] == ["ok", "ok", "skipped", "ok"]
    labels, matrix = inspector.matrix()
    usage = np.array([[float(r[e]) for e in EXPERTS] for r in rows if r["status"] == "ok"])
    np.testing.assert_allclose(usage[[0, 2]].mean(axis=0), matrix[0], atol=1e-5)  # what the heatmap shows
    assert "Exported to" in inspector.hint.text()

    # a cancelled dialog writes nothing; an unwritable path is a message, not a traceback
    monkeypatch.setattr(inspector_widget.QFileDialog, "getSaveFileName", staticmethod(lambda *a, **k: ("", "")))
    assert inspector.export_csv() is None
    start = len(notification_manager.records)
    assert inspector.export_csv(tmp_path / "nowhere" / "x.csv") is None
    messages = [str(n.message) for n in notification_manager.records[start:]]
    assert any("Export failed" in m and "does not exist" in m for m in messages)
    assert inspector.export_csv(tmp_path / "direct.csv") == tmp_path / "direct.csv"  # path injectable
    assert read_rows(tmp_path / "direct.csv") == (header, rows)


def test_csv_cells_from_the_users_files_never_run_as_formulas(tmp_path, model_path):
    """An image named like a formula reaches the usage CSV as text (OWASP), as in dmoe evaluate's report."""
    import shutil

    from napari_dmoe.io.checkpoint import load_model
    from napari_dmoe.inference.sweep import iter_folder_usage, write_folder_csv

    write_cases(tmp_path / "cases")
    shutil.copy(tmp_path / "cases" / "a.png", tmp_path / "cases" / "=1+2.png")
    cases = tmp_path / "cases" / "formula.csv"
    cases.write_text("image,race\n=1+2.png,Black\n")
    _, result = drain(iter_folder_usage(load_model(model_path), tmp_path / "cases", cases, device="cpu"))
    _, rows = read_rows(write_folder_csv(result, tmp_path / "usage.csv"))
    assert rows[0]["case"] == "'=1+2.png" and rows[0]["status"] == "ok"
