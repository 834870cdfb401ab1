"""The magicgui function widgets (issue 23 item 15) on a real viewer (xvfb): contributed through npe2 (Plugins menu,
Layers > Segment), runnable from a script, on the same engine facade as the dock widgets: the same
mask, names, provenance and refusals. Real tiny model files and real image files."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

if importlib.util.find_spec("napari") is None:  # a core-only install; find_spec does not import napari
    pytest.skip("napari is not installed", allow_module_level=True)

from inference_models import make_image  # noqa: E402

pytestmark = pytest.mark.gui
LAYER_WIDGET, FOLDER_WIDGET = "Segment layer with dMoE", "Segment a folder with dMoE"


def listed(path):
    """A model the user opened before (it is in the shared recent list the widgets choose from)."""
    from napari_dmoe.plugin.widgets.controls import ModelList

    ModelList.shared().add(path)
    return str(path)


def wait(qtbot, worker, timeout=60000):
    with qtbot.waitSignal(worker.finished, timeout=timeout):
        pass


def test_contributed_through_npe2_menus(make_napari_viewer, registered_plugin):
    import npe2
    from napari._app_model import get_app_model

    manifest = npe2.PluginManager.instance().get_manifest("napari-dmoe")
    assert {w.display_name for w in manifest.contributions.widgets} >= {LAYER_WIDGET, FOLDER_WIDGET}
    make_napari_viewer()  # registers the plugin's menus with napari's app model
    # Layers > Segment (napari 0.9 keeps the layer list's context menu to itself: not a contributable menu)
    items = [getattr(item, "command", None) for item in get_app_model().menus.get_menu("napari/layers/segment")]
    assert "napari-dmoe.segment_layer_from_menu" in [c.id for c in items if c is not None]
    plugins = [getattr(item, "command", None) for item in get_app_model().menus.get_menu("napari/plugins/napari-dmoe")]
    assert {"napari-dmoe.segment_layer_widget", "napari-dmoe.segment_folder_widget"} <= {c.id for c in plugins if c}


def test_segment_layer_widget_equals_the_engine_and_the_dock(make_napari_viewer, qtbot, model_path):
    from napari_dmoe.inference.engine import segment
    from napari_dmoe.io.checkpoint import load_model

    viewer = make_napari_viewer()
    image = viewer.add_image(make_image(), name="scan", scale=(0.5, 2.0))
    _, gui = viewer.window.add_plugin_dock_widget("napari-dmoe", LAYER_WIDGET)
    gui.model.value = listed(model_path)
    assert gui.attribute.choices == ("unknown", "race=Asian", "race=Black", "race=White")
    gui.attribute.value = "race=Black"
    gui.device.value = "cpu"
    wait(qtbot, gui())
    mask = viewer.layers["mask [race=Black; tiny] scan"]
    assert "experts [race=Black; tiny] scan" in viewer.layers
    expected = segment(load_model(model_path), image.data, "Black", device="cpu", spacing=(0.5, 2.0))
    np.testing.assert_array_equal(mask.data, expected.labels)
    prov = mask.metadata["dmoe"]
    assert prov["attribute_used"] == {"race": "Black"} and prov["forced"] is False

    # an image that does not fit is refused, then segmented with "segment anyway", which the mask records
    stack = viewer.add_image(np.stack([make_image()] * 3), name="stack")
    gui.image.value = stack
    wait(qtbot, gui())
    assert not any(layer.name.endswith("] stack") for layer in viewer.layers if layer is not stack)
    gui.attribute.value = "race=Black"  # a new image starts "unknown", as in the Segment widget
    gui.segment_anyway.value = True
    wait(qtbot, gui())
    forced = viewer.layers["mask [race=Black; tiny] stack"].metadata["dmoe"]
    assert forced["forced"] is True and any("3D volume" in f for f in forced["fit_findings"])


def test_layers_menu_opens_the_widget_on_the_selected_layer(make_napari_viewer, model_path, registered_plugin):
    from napari._app_model import get_app_model

    viewer = make_napari_viewer()
    viewer.add_image(make_image(), name="a")
    b = viewer.add_image(make_image((40, 40)), name="b")
    viewer.layers.selection.active = b
    get_app_model().commands.execute_command("napari-dmoe.segment_layer_from_menu").result()
    gui = viewer.window.dock_widgets[f"{LAYER_WIDGET} (napari-dmoe)"]
    assert gui.image.value is b


def test_from_a_script(make_napari_viewer, model_path):
    from napari_dmoe.plugin.functions import add_results, segment_layer

    viewer = make_napari_viewer()
    layer = viewer.add_image(make_image(), name="scan")
    tuples = segment_layer(layer, str(model_path), "race=White", device="cpu")
    placed = add_results(viewer, tuples)
    assert [p.name for p in placed][0] == "mask [race=White; tiny] scan"
    assert placed[0].metadata["dmoe"]["attribute_used"] == {"race": "White"}


def test_segment_a_folder_writes_masks_with_provenance_and_skips_done(make_napari_viewer, qtbot, model_path,
                                                                      tmp_path):
    from PIL import Image

    from napari_dmoe.io.provenance import read_provenance

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(((make_image((64, 64)) + 2) * (50 + 10 * i)).astype(np.uint8)).save(images / f"c{i}.png")
    (images / "notes.txt").write_text("not an image")
    (tmp_path / "table.csv").write_text("image,race\nc0.png,Asian\nc1.png,White\n")
    viewer = make_napari_viewer()
    _, gui = viewer.window.add_plugin_dock_widget("napari-dmoe", FOLDER_WIDGET)
    gui.folder.value, gui.output.value, gui.model.value = images, tmp_path / "masks", listed(model_path)
    gui.attribute.value, gui.device.value = "race=Black", "cpu"
    steps = []
    worker = gui()
    worker.yielded.connect(steps.append)
    wait(qtbot, worker)
    summary = gui.summary
    assert sorted(p.name for p in summary.written) == ["c0_labels.png", "c1_labels.png", "c2_labels.png"]
    assert not summary.failed and any(s.text.startswith("3/3 c2.png") for s in steps)
    saved = read_provenance(tmp_path / "masks" / "c1_labels.png")
    assert saved["attribute"] == {"race": "Black"} and saved["forced"] is False and saved["model"] == model_path.name

    gui.csv.value = tmp_path / "table.csv"  # the CSV's attributes, and finished cases are skipped
    wait(qtbot, gui())
    assert gui.summary.skipped == ["c0.png", "c1.png"] and not gui.summary.written
    gui.overwrite.value = True
    wait(qtbot, gui())
    assert read_provenance(tmp_path / "masks" / "c1_labels.png")["attribute"] == {"race": "White"}
