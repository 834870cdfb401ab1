"""Segment widget: fit banner, where attribute values come from, progress in the dock, expert views, sweep table,
save button, devices and settings that persist (issue 13). Real viewer (xvfb), real tiny and demo models."""
from __future__ import annotations

import importlib.util

from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("napari") is None:  # a core-only install; find_spec does not import napari
    pytest.skip("napari is not installed", allow_module_level=True)
from inference_models import make_image


def left_button():  # an enum member: PyQt6 refuses the plain int; Qt loads inside gui tests only
    from qtpy.QtCore import Qt

    return Qt.MouseButton.LeftButton


pytestmark = pytest.mark.gui
WIDGET = "Segment (dMoE)"
MODELS = Path(__file__).resolve().parent.parent / "napari_dmoe" / "assets" / "models"


def dock(viewer, model_path=None):
    _, widget = viewer.window.add_plugin_dock_widget("napari-dmoe", WIDGET)
    if model_path is not None:
        widget.models.set_path(model_path)
    return widget


def add_sample(viewer, name):
    from napari_dmoe.plugin import samples

    layers = []
    for data, kwargs, kind in getattr(samples, name)():
        layers.append(getattr(viewer, f"add_{kind}")(data, **kwargs))
    return layers


def run_and_wait(qtbot, widget, button=None, timeout=60000):
    qtbot.mouseClick(button or widget.run_button, left_button())
    assert widget.worker is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=timeout)


def test_a_mismatched_image_shows_a_banner_and_the_button_says_so(make_napari_viewer, registered_plugin):
    viewer = make_napari_viewer()
    add_sample(viewer, "fundus_sample")
    widget = dock(viewer, MODELS / "fundus-dmoe.safetensors")
    assert widget.fit_banner.isHidden() and widget.run_button.text() == "Segment"
    add_sample(viewer, "retina_photo")  # a colour photo for a model trained on grey SLO images
    widget.models.set_path(MODELS / "skin-dmoe.safetensors")
    assert not widget.fit_banner.isHidden()
    text = widget.fit_banner.text()
    assert "does not fit the model 'skin-dmoe'" in text and "dermoscopy" in text
    assert widget.run_button.text() == "Segment anyway"
    assert "colour (3 channels)" not in text  # both are colour; the kind of image and its intensities differ
    widget.images.setCurrentText("fundus (synthetic)")  # its race attribute picks the fundus model back: it fits
    assert Path(widget.models.path()).name == "fundus-dmoe.safetensors" and widget.fit_banner.isHidden()
    widget.models.set_path(MODELS / "skin-dmoe.safetensors")  # the user insists on the skin model
    assert "the image is grey (1 channel)" in widget.fit_banner.text()


def test_attribute_sources_and_no_silent_reuse(make_napari_viewer, registered_plugin):
    from napari_dmoe.plugin.widgets.controls import FROM_DICOM, FROM_SAMPLE, FROM_USER, NOT_KNOWN

    viewer = make_napari_viewer()
    add_sample(viewer, "skin_sample")
    widget = dock(viewer, MODELS / "skin-dmoe.safetensors")
    form = widget.attributes
    assert form.values() == {"age": "80+"} and form.source("age") == FROM_SAMPLE
    assert form.sources["age"].text() == "from sample"
    add_sample(viewer, "retina_photo")  # no attribute: back to unknown, clearly shown, never the skin's 80+
    assert widget.images.currentText() == "retina (scikit-image)"
    assert form.values() == {"age": "unknown"} and form.source("age") == NOT_KNOWN
    assert form.sources["age"].text() == "not known: choose"
    combo = form.combos["age"]
    combo.setCurrentText("40-59")
    combo.activated.emit(combo.currentIndex())  # what a user's pick emits
    assert form.source("age") == FROM_USER and form.sources["age"].text() == "set by you"
    widget.images.setCurrentText("skin lesion (synthetic)")
    assert form.values() == {"age": "80+"} and form.source("age") == FROM_SAMPLE
    widget.images.setCurrentText("retina (scikit-image)")  # the user's pick for this image is remembered
    assert form.values() == {"age": "40-59"} and form.source("age") == FROM_USER
    rgb = np.zeros((64, 64, 3), np.uint8)
    viewer.add_image(rgb, name="dicom photo", rgb=True,
                     metadata={"format": "dicom", "modality": "XC", "patient": {"age": "067Y", "sex": "F"}})
    assert form.values() == {"age": "60-79"} and form.source("age") == FROM_DICOM
    assert form.sources["age"].text() == "from DICOM header"


def test_progress_in_the_dock_and_wall_time_with_loading(make_napari_viewer, qtbot, model_path):
    viewer = make_napari_viewer()
    viewer.add_image(np.stack([make_image((32, 32))] * 6), name="stack")
    widget = dock(viewer, model_path)
    widget.advanced.batch.setValue(1)
    widget.attributes.set_value("race", "Black")  # one router: one window batch per slice
    stages = []
    qtbot.mouseClick(widget.run_button, left_button())
    assert not widget.progress_panel.isHidden()
    widget.worker.yielded.connect(lambda _: stages.append(widget.progress_panel.stage.text()))
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30000)
    assert any("window batch" in s and "/6" in s for s in stages)
    assert widget.progress_panel.isHidden()
    text = widget.status.text()
    assert text.startswith("Done in ") and "loading the model" in text
    wall = float(text.split()[2])
    engine = sum(viewer.layers["mask [race=Black; tiny] stack"].metadata["dmoe"]["timings"].values())
    assert wall >= engine  # the wall time the user waited, not only the engine's share


@pytest.mark.slow
def test_axis_labels_heatmap_colorbar_legend_and_one_expert(make_napari_viewer, qtbot, model_path,
                                                           registered_plugin):
    viewer = make_napari_viewer()
    viewer.add_image(make_image(), name="scan")
    widget = dock(viewer, model_path)
    run_and_wait(qtbot, widget)
    assert tuple(viewer.dims.axis_labels) == ("expert", "y", "x")
    add_sample(viewer, "prostate_sample")  # the 3D sample picks the 3D demo model
    assert Path(widget.models.path()).name == "prostate-dmoe.safetensors"
    assert widget.fit_banner.isHidden()
    run_and_wait(qtbot, widget, timeout=120000)
    assert tuple(viewer.dims.axis_labels) == ("expert", "z", "y", "x")  # not "expert" on z as before
    heat = viewer.layers["experts [stage=T3; prostate-dmoe] prostate CT (synthetic)"]
    dominant = viewer.layers["dominant expert [stage=T3; prostate-dmoe] prostate CT (synthetic)"]
    mask = viewer.layers["mask [stage=T3; prostate-dmoe] prostate CT (synthetic)"]
    assert tuple(heat.axis_labels) == ("expert", "z", "y", "x") and tuple(mask.axis_labels) == ("z", "y", "x")
    assert heat.colorbar.visible and heat.blending == "translucent"
    assert heat.colormap.map(np.array([0.0]))[0][3] == 0  # no weight: transparent, the CT shows through
    assert widget.experts.legend.count() == heat.data.shape[0] == 8
    widget.experts.show_expert(5)
    assert heat.visible and not dominant.visible and viewer.dims.current_step[0] == 5
    assert viewer.text_overlay.visible and viewer.text_overlay.text.startswith("expert 5: gate weight")
    colours = {tuple(np.round(dominant.get_color(e + 1), 3)) for e in range(8)}
    assert len(colours) == 8  # every expert its own colour in the dominant-expert map
    widget.experts.show_dominant()
    assert dominant.visible and not heat.visible


def test_sweep_shows_one_mask_and_says_what_its_dice_means(make_napari_viewer, qtbot, model_path):
    viewer = make_napari_viewer()
    viewer.add_image(make_image(), name="scan")
    widget = dock(viewer, model_path)
    assert not widget.save_button.isEnabled()  # nothing to save yet
    widget.attributes.set_value("race", "White")
    run_and_wait(qtbot, widget, button=widget.sweep_button)
    masks = [l for l in viewer.layers if l.metadata.get("dmoe", {}).get("kind") == "mask"]
    assert len(masks) == 3 and [m.name for m in masks if m.visible] == ["mask [race=White; tiny] scan"]
    assert widget.save_button.isEnabled()
    assert widget.sweep_table.rowCount() == 3
    assert "not accuracy" in widget.sweep_panel.note.text()
    viewer.add_image(make_image((40, 40)), name="other")  # another image: the rows were about the first one
    assert widget.sweep_table.rowCount() == 0


def test_no_gpu_is_one_plain_sentence_and_several_gpus_are_listed(make_napari_viewer, monkeypatch):
    import torch

    from napari_dmoe import devices
    from napari_dmoe.plugin.widgets.controls import DevicePicker

    picker = DevicePicker()
    assert picker.reason.text() == "No GPU found: segmentation runs on the CPU, which is slower."
    monkeypatch.setattr(devices, "cuda_problem", lambda: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    picker = DevicePicker()
    names = [picker.combo.itemData(i) for i in range(picker.combo.count())]
    assert names == ["auto", "cpu", "cuda:0", "cuda:1", "mps"] and picker.reason.isHidden()
    picker.set_device("cuda:1")
    assert picker.device() == "cuda:1"


def test_settings_persist_between_sessions(make_napari_viewer, model_path):
    viewer = make_napari_viewer()
    viewer.add_image(make_image(), name="scan")
    widget = dock(viewer, model_path)
    widget.devices.set_device("cpu")
    widget.advanced.batch.setValue(2)
    widget.advanced.roi.setText("32,32")
    widget.advanced.maps.setChecked(False)
    viewer.close()
    viewer = make_napari_viewer()  # a new napari session, same user settings
    widget = dock(viewer)
    assert widget.models.path() == str(model_path)
    assert widget.devices.device() == "cpu"
    assert (widget.advanced.batch.value(), widget.advanced.roi.text(), widget.advanced.maps.isChecked()) == (
        2, "32,32", False)


def test_sample_ground_truth_opens_hidden_and_named(make_napari_viewer):
    viewer = make_napari_viewer()
    for name in ("fundus_sample", "prostate_sample", "skin_sample"):
        image, truth = add_sample(viewer, name)
        assert truth.name.startswith("GROUND TRUTH") and not truth.visible and image.visible


def test_inspector_follows_the_newest_result_in_napari_colours(make_napari_viewer, qtbot, model_path):
    from matplotlib.colors import to_hex
    from napari.utils.theme import get_theme

    viewer = make_napari_viewer()
    viewer.add_image(make_image(), name="first")
    widget = dock(viewer, model_path)
    _, inspector = viewer.window.add_plugin_dock_widget("napari-dmoe", "Routing inspector")
    run_and_wait(qtbot, widget)
    viewer.add_image(make_image((40, 40)), name="second")
    run_and_wait(qtbot, widget)
    assert inspector.groups.currentText().startswith("second |")
    viewer.layers.selection.active = viewer.layers["first"]
    widget.images.setCurrentText("first")
    run_and_wait(qtbot, widget)  # re-run on the first image: the inspector goes back to it
    assert inspector.groups.currentText().startswith("first |")
    ax, bar = inspector.figure.axes
    assert bar.get_ylabel() == "mean gate weight" and ax.get_title() == "mean gate weight per expert"
    assert to_hex(inspector.figure.get_facecolor()) == get_theme(viewer.theme).background.as_hex()


def test_finetune_settings_survive_a_run_and_a_restart_and_the_pairs_table_shows_five_rows(make_napari_viewer,
                                                                                         model_path):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-dmoe", "Fine-tune (dMoE)")
    widget.models.set_path(model_path)
    widget.settings.steps.setValue(7)
    widget.settings.lr.setValue(0.0042)
    widget.models.refresh(select=str(model_path))  # what the end of a run does (the new model joins the list)
    assert (widget.settings.steps.value(), widget.settings.lr.value()) == (7, 0.0042)
    table = widget.pairs
    header = table.horizontalHeader().height() or table.horizontalHeader().sizeHint().height()
    assert (table.minimumHeight() - header) // table.verticalHeader().defaultSectionSize() >= 5
    viewer.close()
    viewer = make_napari_viewer()  # next napari session
    _, widget = viewer.window.add_plugin_dock_widget("napari-dmoe", "Fine-tune (dMoE)")
    assert (widget.settings.steps.value(), widget.settings.lr.value()) == (7, 0.0042)
