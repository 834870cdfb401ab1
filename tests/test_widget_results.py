"""Which result a user gets (issue 23), on a real viewer (xvfb) with real tiny model files: Save writes the mask the
Segment widget shows (after a sweep too), two models' results on one image coexist, the model list is one live list,
the model the user chose survives a restart, switching images clears the last image's status and legend, a CT's
slider is named "z", and the Fine-tune dock scrolls."""
from __future__ import annotations

import importlib.util

from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("napari") is None:  # a core-only install; find_spec does not import napari
    pytest.skip("napari is not installed", allow_module_level=True)
from PIL import Image  # noqa: E402

from inference_models import make_image, make_model  # noqa: E402
from test_widget_segment import dock, results, run_and_wait  # noqa: E402

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A second tiny model (another seed, another file name): its masks differ from ``model_path``'s."""
    return make_model(tmp_path_factory.mktemp("models2") / "other.safetensors", seed=1)


def test_save_after_a_sweep_writes_the_shown_attribute(make_napari_viewer, qtbot, model_path, tmp_path, monkeypatch):
    from qtpy.QtWidgets import QFileDialog

    viewer = make_napari_viewer()
    viewer.add_image(make_image(), name="scan")
    widget = dock(viewer, model_path)
    widget.attributes.set_value("race", "Black")
    run_and_wait(qtbot, widget, button=widget.sweep_button)
    masks = {m.metadata["dmoe"]["attribute_used"]["race"]: m for m in results(viewer)}
    assert sorted(masks) == ["Asian", "Black", "White"]
    assert not np.array_equal(masks["Black"].data, masks["White"].data)  # the attribute matters for this model
    viewer.layers.selection.active = masks["White"]  # the last value swept, selected in the layer list
    monkeypatch.chdir(tmp_path)
    asked = []
    monkeypatch.setattr(QFileDialog, "getSaveFileName",
                        lambda parent, title, default, filters: (asked.append(default), (default, ""))[1])
    written = widget.save_mask()
    assert asked == [str(tmp_path / "scan_mask_race-Black_tiny.png")] and written == Path(asked[0])
    np.testing.assert_array_equal(np.asarray(Image.open(written)), masks["Black"].data)  # not White's
    from napari_dmoe.io.provenance import read_provenance

    assert read_provenance(written)["attribute"] == {"race": "Black"}  # and the file says so

    # an edited mask kept beside a re-run: two masks of the shown attribute, so the user is asked which
    masks["Black"].data = np.zeros_like(masks["Black"].data)
    run_and_wait(qtbot, widget)
    offered = []
    widget.ask_mask = lambda parent, names, why: (offered.append(names), names[0])[1]
    widget.save_mask(tmp_path / "asked.png")
    assert sorted(offered[0]) == ["mask [race=Black; tiny] scan", "mask [race=Black; tiny] scan (edited)"]


def test_two_models_results_coexist_and_save_follows_the_model(make_napari_viewer, qtbot, model_path, other_model,
                                                                tmp_path):
    viewer = make_napari_viewer()
    viewer.add_image(make_image(), name="scan")
    widget = dock(viewer, model_path)
    widget.attributes.set_value("race", "Asian")
    run_and_wait(qtbot, widget)
    first = viewer.layers["mask [race=Asian; tiny] scan"]
    kept = first.data.copy()
    widget.models.set_path(other_model)
    widget.attributes.set_value("race", "Asian")
    run_and_wait(qtbot, widget)
    second = viewer.layers["mask [race=Asian; other] scan"]
    assert first in viewer.layers and not np.array_equal(first.data, second.data)
    np.testing.assert_array_equal(first.data, kept)  # the first model's result is untouched
    assert {m.metadata["dmoe"]["model"] for m in results(viewer)} == {str(model_path), str(other_model)}
    assert len(results(viewer, "experts")) == 2
    written = widget.save_mask(tmp_path / "m.png")  # the widget shows the other model: its mask is saved
    np.testing.assert_array_equal(np.asarray(Image.open(written)), second.data)
    widget.models.set_path(model_path)
    np.testing.assert_array_equal(np.asarray(Image.open(widget.save_mask(tmp_path / "f.png"))), first.data)


def test_a_new_model_is_listed_at_once_in_every_picker(make_napari_viewer, model_path, other_model):
    """What the fine-tune does with its new model (``ModelList.add``) lists it in the Segment widget at once, which
    keeps the user's model selected."""
    from napari_dmoe.plugin.widgets.controls import ModelList

    viewer = make_napari_viewer()
    segment = dock(viewer, model_path)
    _, finetune = viewer.window.add_plugin_dock_widget("napari-dmoe", "Fine-tune (dMoE)")
    assert segment.models.combo.findData(str(other_model)) < 0
    changed = []
    segment.models.changed.connect(changed.append)
    ModelList.shared().add(other_model)
    for picker in (segment.models, finetune.models):
        assert picker.combo.findData(str(other_model)) >= 0
    assert segment.models.path() == str(model_path) and changed == []  # listed, not switched to


def test_the_chosen_model_survives_a_restart_with_a_sample_open(make_napari_viewer, model_path, registered_plugin):
    viewer = make_napari_viewer()
    widget = dock(viewer, model_path)  # the user's choice: a race model that is not the demo one
    viewer.open_sample("napari-dmoe", "prostate")  # the widget picks the prostate demo model for this image
    assert Path(widget.models.path()).name == "prostate-dmoe.safetensors"
    viewer.close()
    viewer = make_napari_viewer()  # next session, opened with the fundus sample (race) as launch.py does
    viewer.open_sample("napari-dmoe", "fundus")
    widget = dock(viewer)
    assert widget.models.path() == str(model_path)  # the last model chosen, not the sample's demo model


def test_switching_images_clears_status_and_legend_and_names_the_ct_slider(make_napari_viewer, qtbot, model_path,
                                                                          registered_plugin):
    viewer = make_napari_viewer()
    viewer.add_image(make_image(), name="scan")
    widget = dock(viewer, model_path)
    run_and_wait(qtbot, widget)
    assert widget.status.text().startswith("Done") and not widget.experts.isHidden()
    assert tuple(viewer.dims.axis_labels) == ("expert", "y", "x")
    viewer.add_image(make_image((40, 40)), name="second")  # a new image is selected in the widget
    assert widget.images.currentText() == "second"
    assert widget.status.text() == "" and widget.experts.isHidden()
    widget.images.setCurrentText("scan")  # back: its own heatmaps and legend again
    assert not widget.experts.isHidden()
    assert widget.experts.layers["experts"].name == "experts [race=unknown; tiny] scan"
    viewer.open_sample("napari-dmoe", "prostate")  # a 3D CT beside the 2D result's expert stack: one shared axis
    assert tuple(viewer.dims.axis_labels)[0] == "z"


def test_the_finetune_dock_scrolls(make_napari_viewer, model_path):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-dmoe", "Fine-tune (dMoE)")
    content = widget.scroll_area.widget()
    assert content.sizeHint().height() > 700  # the whole form is tall ...
    assert widget.minimumSizeHint().height() < 300  # ... but the dock needs little height: it scrolls
    _, segment = viewer.window.add_plugin_dock_widget("napari-dmoe", "Segment (dMoE)")
    assert segment.minimumSizeHint().height() < 300


@pytest.mark.slow
def test_the_end_of_a_finetune_neither_rewinds_the_bar_nor_freezes(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    """Item 8: the training bar only moves forward and ends full, the comparison gets a busy bar (not a bar back at
    0 %), the GUI thread never stalls for long between the end of training and the end of the run, and the new
    model is listed in the Segment widget at once (item 6). A real ``dmoe train`` subprocess on a tiny model."""
    import sys

    import torch
    from napari.utils import progress

    from napari_dmoe.io.checkpoint import save_model
    from napari_dmoe.model import build_network, make_spec
    from napari_dmoe.plugin.widgets import finetune_session
    from qtpy.QtCore import Qt

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from stall_meter import StallMeter

    bars: list[list[tuple[int, int]]] = []

    class Recorded(progress):  # napari's bar, remembering what it showed
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append([(self.n, self.total)])

        def update(self, n=1):
            super().update(n)
            bars[-1].append((self.n, self.total))

    monkeypatch.setattr(finetune_session, "progress", Recorded)
    torch.manual_seed(0)
    spec = make_spec("transunet2d-tiny", "race", ["Asian", "Black", "White"], ["background", "disc"], n_experts=4)
    base = save_model(tmp_path / "base.safetensors", build_network(spec), spec)
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    for i in range(3):
        labels = np.zeros((64, 64), np.int32)
        labels[16 + i:44, 20:48 - i] = 1
        viewer.add_image(rng.normal(0, 1, (64, 64)).astype(np.float32) + 2 * labels, name=f"scan{i}",
                         metadata={"dmoe_attributes": {"race": ["Asian", "Black", "White"][i]}})
        viewer.add_labels(labels, name=f"scan{i} truth")
    segment = dock(viewer)
    _, widget = viewer.window.add_plugin_dock_widget("napari-dmoe", "Fine-tune (dMoE)")
    widget.models.set_path(base)
    widget.output.setText(str(tmp_path / "runs"))
    widget.devices.combo.setCurrentIndex(widget.devices.combo.findData("cpu"))
    for i in range(3):
        widget.add_pair(image=f"scan{i}", labels=f"scan{i} truth")
    widget.settings.trainable.setCurrentIndex(widget.settings.trainable.findText("all weights", Qt.MatchStartsWith))
    widget.confirm = lambda *_: True  # "all weights" asks first
    widget.settings.steps.setValue(3)
    widget.settings.batch.setValue(2)
    widget.settings.keep_base.setChecked(False)
    assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.phase != "train", timeout=240_000)
    meter = StallMeter()
    meter.start()
    qtbot.waitUntil(lambda: widget.process is None, timeout=240_000)
    meter.stop()
    assert widget.new_model is not None, widget.status.text()
    training, comparing = bars[0], bars[-1]
    assert [n for n, _ in training] == sorted(n for n, _ in training) and training[-1][0] == training[-1][1] == 3
    assert len(bars) == 2 and comparing[0][1] == 0  # busy: no percentage to drop back
    assert meter.longest_stall_ms < 1000, meter.longest_stall_ms
    assert segment.models.combo.findData(str(widget.new_model)) >= 0


def test_save_dicom_seg_from_a_series_without_study_time(make_napari_viewer, qtbot, tmp_path, notifications):
    """Item 14: anonymised series lack StudyTime (and PatientBirthDate): Save writes a valid SEG (the Type 2 tags
    empty, as the standard allows), never a Python error."""
    import highdicom as hd
    import pydicom

    from inference_models import tiny
    from napari_dmoe.io.checkpoint import save_model
    from test_dicom_seg import make_series

    make_series(tmp_path / "ct", n=8, size=64)
    for path in (tmp_path / "ct").glob("*.dcm"):
        ds = pydicom.dcmread(path)
        for keyword in ("StudyTime", "PatientBirthDate"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(path)
    model = tiny("resunet3d-tiny", input_size=[64, 64, 64])
    viewer = make_napari_viewer()
    viewer.open(str(tmp_path / "ct"), plugin="napari-dmoe")
    widget = dock(viewer, save_model(tmp_path / "tiny3d.safetensors", model.network, model.spec))
    widget.attributes.set_value("race", "Asian")
    run_and_wait(qtbot, widget, timeout=60000)
    written = widget.save_mask(tmp_path / "seg.dcm")
    assert written is not None, notifications()
    seg = hd.seg.segread(written)
    assert seg.StudyTime == "" and seg.SeriesDescription.startswith("dMoE SEG")


def test_the_fit_banner_is_whole_at_the_default_dock_width(make_napari_viewer, qtbot, registered_plugin):
    """Item 10: at napari's default window and dock size the banner wraps inside the dock: nothing cut at the right
    or the bottom (the dock is as wide as its contents need, and scrolls up and down)."""
    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-dmoe", "skin")
    widget = dock(viewer, Path(__file__).resolve().parents[1] / "napari_dmoe" / "assets" / "models" /
                  "skin-dmoe.safetensors")
    viewer.open_sample("napari-dmoe", "retina")  # a fundus photo under the skin model: a long banner
    qtbot.waitUntil(lambda: widget.fit_check.worker is None, timeout=60000)
    qtbot.wait(50)
    banner, area = widget.fit_banner, widget.scroll_area
    assert banner.isVisible() and "does not fit the model 'skin-dmoe'" in banner.text()
    assert area.widget().width() <= area.viewport().width()  # no content beyond the right edge
    right = banner.mapTo(area.widget(), banner.rect().topRight()).x()
    assert right <= area.viewport().width()
    assert banner.height() >= banner.heightForWidth(banner.width())  # every wrapped line shown
