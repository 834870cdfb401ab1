"""Re-running the segment widget never throws away a mask the user edited (real viewer, real tiny model)."""
from __future__ import annotations

import numpy as np
import pytest

from test_widget_segment import dock, make_image, results, run_and_wait

MASK = "mask [race=Asian; tiny] scan"


# -- digest helpers (no Qt) ----------------------------------------------------------------------------------
def test_digest_sees_content_dtype_and_shape():
    from napari_dmoe.plugin.results import DIGEST_KEY, RESULT_KEY, data_digest, edited_name, is_edited

    a = np.arange(24, dtype=np.uint8).reshape(4, 6)
    assert data_digest(a) == data_digest(a.copy()) == data_digest(np.asfortranarray(a))
    assert data_digest(a) != data_digest(a.reshape(6, 4))  # same bytes, other shape
    assert data_digest(a) != data_digest(a.view(np.int8))  # same bytes, other dtype
    meta = {RESULT_KEY: {"kind": "mask", DIGEST_KEY: data_digest(a)}}
    assert not is_edited(meta, a.copy())
    b = a.copy()
    b[2, 3] += 1
    assert is_edited(meta, b)
    assert is_edited(meta, np.array([object()]))  # cannot hash: counted as edited, so it is kept
    assert not is_edited({RESULT_KEY: {"kind": "experts"}}, b)  # no digest (heatmaps): replaced as before
    assert not is_edited({}, b)  # not one of our layers
    assert edited_name("m", {"x"}) == "m (edited)"
    assert edited_name("m", {"m (edited)", "m (edited 2)"}) == "m (edited 3)"


# -- the widget ----------------------------------------------------------------------------------------------
def paint_edit(layer):
    y, x = (s // 2 for s in layer.data.shape)
    layer.brush_size = 5
    layer.paint((y, x), int(layer.data[y, x] + 1) % 3)  # napari's paint tool, as a mouse stroke does


def inplace_edit(layer):
    layer.data[:5] = 0  # a plugin or the console writing into the array; napari emits no event for this
    layer.refresh()


def replace_edit(layer):
    layer.data = np.where(layer.data == 1, 2, layer.data).astype(layer.data.dtype)


@pytest.mark.slow
@pytest.mark.gui
@pytest.mark.parametrize("edit", [paint_edit, inplace_edit, replace_edit])
def test_edited_mask_survives_a_rerun(make_napari_viewer, qtbot, model_path, edit, notifications):
    viewer = make_napari_viewer()
    viewer.add_image(make_image(), name="scan")
    widget = dock(viewer, model_path)
    widget.attributes.set_value("race", "Asian")
    run_and_wait(qtbot, widget)
    first = viewer.layers[MASK]
    original = first.data.copy()
    n_layers = len(viewer.layers)
    edit(first)
    edited = first.data.copy()
    assert np.any(edited != original)

    run_and_wait(qtbot, widget)
    assert len(viewer.layers) == n_layers + 1  # the edited mask is kept beside the full fresh result
    kept = viewer.layers[f"{MASK} (edited)"]
    assert kept is first and kept.metadata["dmoe"]["edited"]
    np.testing.assert_array_equal(kept.data, edited)
    fresh = viewer.layers[MASK]
    assert fresh is not first
    np.testing.assert_array_equal(fresh.data, original)  # deterministic inference: the unedited result
    assert "kept your edited" in widget.status.text()
    assert any(s == "info" and f"'{MASK} (edited)'" in m for s, m in notifications())

    # the fresh result is replaced as usual; editing it too keeps it under the next free name
    run_and_wait(qtbot, widget)
    assert len(viewer.layers) == n_layers + 1 and viewer.layers[MASK] is not fresh
    inplace_edit(viewer.layers[MASK])
    run_and_wait(qtbot, widget)
    assert len(viewer.layers) == n_layers + 2
    assert f"{MASK} (edited 2)" in viewer.layers
    np.testing.assert_array_equal(viewer.layers[f"{MASK} (edited)"].data, edited)


@pytest.mark.gui
def test_unedited_results_are_replaced_including_an_undone_edit(make_napari_viewer, qtbot, model_path):
    viewer = make_napari_viewer()
    viewer.add_image(make_image(), name="scan")
    widget = dock(viewer, model_path)
    widget.attributes.set_value("race", "Asian")
    run_and_wait(qtbot, widget)
    n_layers = len(viewer.layers)
    assert all("data_digest" in layer.metadata["dmoe"] for layer in results(viewer))
    assert "data_digest" not in results(viewer, "experts")[0].metadata["dmoe"]
    mask = viewer.layers[MASK]
    paint_edit(mask)
    mask.undo()  # painted, then undone: the content is what we made, so it is replaced like any other
    dominant = results(viewer, "dominant")[0]
    run_and_wait(qtbot, widget)
    assert len(viewer.layers) == n_layers  # no pile-up, no "(edited)" layer
    assert not any("(edited" in layer.name for layer in viewer.layers)
    assert viewer.layers[MASK] is not mask and results(viewer, "dominant")[0] is not dominant
    assert "kept" not in widget.status.text()
