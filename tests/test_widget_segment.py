"""Segment widget through the plugin manifest, on a real viewer (xvfb), with a real tiny dMoE model file."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

if importlib.util.find_spec("napari") is None:  # a core-only install; find_spec does not import napari
    pytest.skip("napari is not installed", allow_module_level=True)


def left_button():  # an enum member: PyQt6 refuses the plain int; Qt loads inside gui tests only
    from qtpy.QtCore import Qt

    return Qt.MouseButton.LeftButton


pytestmark = pytest.mark.gui

WIDGET = "Segment (dMoE)"
RACES = ["Asian", "Black", "White"]
CLASSES = ["background", "rim", "cup"]

from inference_models import make_image  # noqa: E402


def dock(viewer, model_path=None):
    _, widget = viewer.window.add_plugin_dock_widget("napari-dmoe", WIDGET)
    if model_path is not None:
        widget.models.set_path(model_path)
    return widget


def results(viewer, kind="mask"):
    return [l for l in viewer.layers if l.metadata.get("dmoe", {}).get("kind") == kind]


def run_and_wait(qtbot, widget, button=None, timeout=20000):
    qtbot.mouseClick(button or widget.run_button, left_button())
    assert widget.worker is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=timeout)


@pytest.mark.slow
def test_segment_adds_aligned_layers_with_provenance(make_napari_viewer, qtbot, model_path):
    from napari_dmoe.io.checkpoint import load_model
    from napari_dmoe.inference.engine import segment

    viewer = make_napari_viewer()
    image = viewer.add_image(make_image(), name="scan", scale=(0.5, 2.0), translate=(3.0, -4.0))
    widget = dock(viewer, model_path)
    combo = widget.attributes.combos["race"]
    assert [combo.itemText(i) for i in range(combo.count())] == [*RACES, "unknown"]
    widget.attributes.set_value("race", "Black")
    widget.devices.combo.setCurrentIndex(widget.devices.combo.findData("cpu"))
    run_and_wait(qtbot, widget)

    mask = viewer.layers["mask [race=Black; tiny] scan"]
    experts = viewer.layers["experts [race=Black; tiny] scan"]
    dominant = viewer.layers["dominant expert [race=Black; tiny] scan"]
    assert mask.data.shape == image.data.shape == dominant.data.shape
    for layer in (mask, dominant):
        np.testing.assert_allclose(layer.scale, image.scale)
        np.testing.assert_allclose(layer.translate, image.translate)
    assert experts.data.shape == (4, *image.data.shape)
    assert tuple(viewer.dims.axis_labels) == ("expert", "y", "x")  # the heatmaps' slider says what it browses
    np.testing.assert_allclose(experts.scale, (1.0, *image.scale))
    np.testing.assert_allclose(experts.translate, (0.0, *image.translate))
    assert mask.visible and not experts.visible and not dominant.visible
    assert tuple(experts.contrast_limits) == (0.0, 1.0)
    assert list(mask.features["class"]) == CLASSES
    assert 1 <= dominant.data.min() and dominant.data.max() <= 4  # expert index + 1, 0 stays transparent

    prov = mask.metadata["dmoe"]
    assert prov["model"] == str(model_path)
    assert prov["attribute_used"] == {"race": "Black"}
    assert prov["device"] == "cpu" and prov["source_layer"] == "scan"
    assert set(prov["timings"]) >= {"preprocess", "infer", "postprocess"}
    assert prov["spec"]["class_names"] == CLASSES
    assert sum(prov["expert_usage"]["mean"]) == pytest.approx(1.0, abs=1e-2)

    # the widget shows exactly what the engine computes
    direct = segment(load_model(model_path), make_image(), "Black", device="cpu", spacing=(0.5, 2.0))
    np.testing.assert_array_equal(mask.data, direct.labels)
    assert len(np.unique(mask.data)) == 3
    assert widget.run_button.text() == "Segment"
    assert "Black" in widget.status.text()


def test_rerun_replaces_same_attribute_and_adds_new_one(make_napari_viewer, qtbot, model_path):
    viewer = make_napari_viewer()
    viewer.add_image(make_image(), name="scan")
    widget = dock(viewer, model_path)
    widget.attributes.set_value("race", "Asian")
    run_and_wait(qtbot, widget)
    first = viewer.layers["mask [race=Asian; tiny] scan"]
    n_layers = len(viewer.layers)
    run_and_wait(qtbot, widget)
    assert len(viewer.layers) == n_layers
    assert viewer.layers["mask [race=Asian; tiny] scan"] is not first  # replaced, not piled up
    widget.attributes.set_value("race", "White")
    run_and_wait(qtbot, widget)
    assert len(viewer.layers) == n_layers + 3
    white = viewer.layers["mask [race=White; tiny] scan"].data
    asian = viewer.layers["mask [race=Asian; tiny] scan"].data
    assert np.count_nonzero(white != asian) > 0  # the attribute changes the mask of this model


def test_results_land_on_the_layer_selected_at_launch(make_napari_viewer, qtbot, model_path):
    viewer = make_napari_viewer()
    a = viewer.add_image(make_image((40, 56)), name="A", scale=(1.5, 1.5))
    b = viewer.add_image(make_image((30, 30)), name="B", scale=(2.0, 3.0), translate=(10.0, 10.0))
    widget = dock(viewer, model_path)
    widget.images.setCurrentText("A")
    qtbot.mouseClick(widget.run_button, left_button())
    widget.images.setCurrentText("B")  # the user moves on while it runs
    viewer.layers.selection.active = b
    qtbot.waitUntil(lambda: widget.worker is None, timeout=20000)
    masks = results(viewer)
    assert [m.name for m in masks] == ["mask [race=unknown; tiny] A"]
    assert masks[0].data.shape == a.data.shape
    np.testing.assert_allclose(masks[0].scale, a.scale)
    np.testing.assert_allclose(masks[0].translate, a.translate)
    assert masks[0].metadata["dmoe"]["attribute_used"]["race"].startswith("unknown")


def test_removed_launch_layer_is_reported_not_crashed(make_napari_viewer, qtbot, model_path, notifications):
    viewer = make_napari_viewer()
    viewer.add_image(make_image(), name="gone")
    widget = dock(viewer, model_path)
    qtbot.mouseClick(widget.run_button, left_button())
    viewer.layers.remove("gone")
    qtbot.waitUntil(lambda: widget.worker is None, timeout=20000)
    assert results(viewer) == []
    assert any("'gone' was removed" in msg for _, msg in notifications())
    assert widget.run_button.text() == "Segment" and not widget.run_button.isEnabled()  # no image left


def test_cancel_stops_the_worker(make_napari_viewer, qtbot, model_path):
    viewer = make_napari_viewer()
    viewer.add_image(np.stack([make_image((32, 32))] * 60), name="stack")  # 2D model: 60 slices
    widget = dock(viewer, model_path)
    widget.advanced.batch.setValue(1)  # one window per step: 60 steps to cancel between
    widget.attributes.set_value("race", "Black")  # one router ("unknown" would run all three)
    steps = []
    qtbot.mouseClick(widget.run_button, left_button())
    worker = widget.worker
    worker.yielded.connect(steps.append)
    with qtbot.waitSignal(worker.aborted, timeout=20000):
        qtbot.waitUntil(lambda: any(s.text.endswith("infer") for s in steps), timeout=20000)
        assert widget.run_button.text() == "Cancel"
        qtbot.mouseClick(widget.run_button, left_button())
        assert widget.run_button.text() == "Cancelling..."
    qtbot.waitUntil(lambda: widget.worker is None, timeout=10000)
    infer = [s for s in steps if s.text.endswith("infer")]
    assert infer and infer[-1].done < infer[-1].total == 60
    assert results(viewer) == []
    # a 2D model on a stack of slices does not fit: the banner says so and the button reads "Segment anyway"
    assert widget.status.text() == "Cancelled." and widget.run_button.text() == "Segment anyway"


def test_bad_model_files_show_errors_and_the_viewer_survives(make_napari_viewer, qtbot, tmp_path, notifications):
    import torch

    from napari_dmoe.io.checkpoint import save_model
    from napari_dmoe.model import build_network, make_spec

    viewer = make_napari_viewer()
    viewer.add_image(make_image(), name="scan")
    widget = dock(viewer)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x80\x04 not a model at all")
    widget.models.set_path(garbage)
    errors = [m for s, m in notifications() if s == "error"]
    assert errors and "garbage.safetensors" in errors[-1]
    assert widget.spec is None and not widget.run_button.isEnabled()
    assert widget.segment() is None  # refused with a message, no worker

    # a readable header whose weights do not fit: fails inside the worker, reported as a notification
    torch.manual_seed(0)
    spec = make_spec("transunet2d-tiny", "race", RACES, CLASSES, n_experts=4)
    other = build_network(make_spec("transunet2d-tiny", "race", RACES, CLASSES, n_experts=2))
    wrong = save_model(tmp_path / "wrong.safetensors", other, spec)
    widget.models.set_path(wrong)
    assert widget.spec is not None
    run_and_wait(qtbot, widget)
    errors = [m for s, m in notifications() if s == "error"]
    assert "failed" in errors[-1] and "wrong.safetensors" in errors[-1]
    assert results(viewer) == [] and widget.status.text().startswith("Failed")
    assert widget.run_button.text() == "Segment" and widget.run_button.isEnabled()


def test_bad_window_size_is_refused_with_a_message(make_napari_viewer, model_path, notifications):
    viewer = make_napari_viewer()
    viewer.add_image(make_image(), name="scan")
    widget = dock(viewer, model_path)
    widget.advanced.roi.setText("96,abc")
    assert widget.segment() is None
    assert any("window size" in m and "2 positive integers" in m for _, m in notifications())


def test_overlay_is_visible_on_screen(make_napari_viewer, qtbot, model_path):
    viewer = make_napari_viewer(show=True)
    viewer.add_image(make_image(), name="scan", colormap="gray")
    widget = dock(viewer, model_path)
    run_and_wait(qtbot, widget)
    mask = results(viewer)[0]
    mask.opacity = 1.0
    viewer.reset_view()
    on = viewer.screenshot(canvas_only=True, flash=False)
    mask.visible = False
    off = viewer.screenshot(canvas_only=True, flash=False)
    changed = np.any(on[..., :3] != off[..., :3], axis=-1)
    assert changed.mean() > 0.05  # the labels are drawn over the image
    mask.visible = True
    labels = mask.data.copy()
    mask.data = np.zeros_like(labels)  # background only: transparent, so the canvas is the image again
    empty = viewer.screenshot(canvas_only=True, flash=False)
    assert np.any(empty[..., :3] != off[..., :3], axis=-1).mean() < 0.001


def test_sweep_table_matches_a_hand_computation(make_napari_viewer, qtbot, model_path):
    viewer = make_napari_viewer()
    viewer.add_image(make_image(), name="scan")
    widget = dock(viewer, model_path)
    run_and_wait(qtbot, widget, button=widget.sweep_button)
    masks = {m.metadata["dmoe"]["attribute_request"]["race"]: m.data for m in results(viewer)}
    assert sorted(masks) == RACES
    table = widget.sweep_table
    assert table.rowCount() == 3
    for row in range(3):
        a, b = table.item(row, 0).text(), table.item(row, 1).text()
        ma, mb = masks[a.split("=")[1]], masks[b.split("=")[1]]
        dices = [2 * np.sum((ma == c) & (mb == c)) / (np.sum(ma == c) + np.sum(mb == c)) for c in (1, 2)]
        assert float(table.item(row, 2).text()) == pytest.approx(np.mean(dices), abs=1e-3)
        assert int(table.item(row, 3).text()) == np.count_nonzero(ma != mb) > 0
        # changed pixels as a share of the masks' foreground (either mask), not of the whole image (issue 23)
        share = 100 * np.count_nonzero(ma != mb) / np.count_nonzero((ma > 0) | (mb > 0))
        assert float(table.item(row, 4).text()) == pytest.approx(share, abs=1e-3)


def test_launch_opens_sample_with_widget_and_preselects_its_attribute(make_napari_viewer, model_path):
    from napari_dmoe.plugin.launch import build_viewer

    viewer, widget, note = build_viewer(make_napari_viewer(), sample="fundus", inspector=False)
    assert "fundus" in note
    assert widget.images.currentText() == "fundus (synthetic)"
    widget.models.set_path(model_path)
    assert widget.attributes.values() == {"race": "Black"}  # from the sample's dmoe_attributes metadata


def test_image_attributes_pick_a_matching_bundled_model(make_napari_viewer, qtbot):
    """A prostate sample (stage attribute) switches the picker from the fundus model to the prostate one."""
    from napari_dmoe.io.checkpoint import read_spec
    from napari_dmoe.io.model_list import bundled_models

    by_attr = {read_spec(e.path).attributes[0].name: e for e in bundled_models()}
    assert {"race", "stage"} <= set(by_attr), "the fundus and prostate demo models ship with the package"
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-dmoe", "Segment (dMoE)")
    widget.models.refresh(select=str(by_attr["race"].path))
    assert [a.name for a in widget.spec.attributes] == ["race"]
    viewer.open_sample("napari-dmoe", "prostate")
    assert widget.models.path() == str(by_attr["stage"].path)
    assert [a.name for a in widget.spec.attributes] == ["stage"]
    assert widget.attributes.values() == {"stage": "T3"}
    assert "prostate" in widget.status.text()

