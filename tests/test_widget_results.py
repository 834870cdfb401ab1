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

    # an edited mask kept beside a re-run: two masks of the shown attribute, so the user is asked which
    masks["Black"].data = np.zeros_like(masks["Black"].data)
    run_and_wait(qtbot, widget)
    offered = []
    widget.ask_mask = lambda parent, names, why: (offered.append(names), names[0])[1]
    widget.save_mask(tmp_path / "asked.png")
    assert sorted(offered[0]) == ["mask [tiny: race=Black] scan", "mask [tiny: race=Black] scan (edited)"]


def test_two_models_results_coexist_and_save_follows_the_model(make_napari_viewer, qtbot, model_path, other_model,
                                                                tmp_path):
    viewer = make_napari_viewer()
    viewer.add_image(make_image(), name="scan")
    widget = dock(viewer, model_path)
    widget.attributes.set_value("race", "Asian")
    run_and_wait(qtbot, widget)
    first = viewer.layers["mask [tiny: race=Asian] scan"]
    kept = first.data.copy()
    widget.models.set_path(other_model)
    widget.attributes.set_value("race", "Asian")
    run_and_wait(qtbot, widget)
    second = viewer.layers["mask [other: race=Asian] scan"]
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
    assert not widget.experts.isHidden() and widget.experts.layers["experts"].name == "experts [tiny: race=unknown] scan"
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
