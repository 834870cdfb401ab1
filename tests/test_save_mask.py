"""The Segment widget's "Save mask..." button: the source's own format by default (DICOM SEG next to a DICOM
series, PNG for a 2D image), the same file as napari's File > Save, and SEG says when the user edited the mask."""
from __future__ import annotations

import highdicom as hd
import numpy as np
from PIL import Image

from inference_models import tiny
from napari_dmoe.plugin.widgets import save_mask as sm
from napari_dmoe.io.checkpoint import save_model
from test_dicom_seg import make_series
from test_widget_segment import dock, make_image, results, run_and_wait


def test_save_mask_of_a_2d_image_defaults_to_png(make_napari_viewer, qtbot, model_path, tmp_path, monkeypatch):
    viewer = make_napari_viewer()
    viewer.add_image(make_image(), name="scan")
    widget = dock(viewer, model_path)
    widget.attributes.set_value("race", "Black")
    assert widget.save_mask(tmp_path / "none.png") is None  # nothing segmented yet: refused, nothing written
    assert not (tmp_path / "none.png").exists()
    run_and_wait(qtbot, widget)
    [mask] = results(viewer)
    monkeypatch.chdir(tmp_path)  # a layer made in napari has no source folder: the working folder is offered
    assert sm.default_path(mask) == tmp_path / "scan_mask_race-Black_tiny.png"
    asked = []

    def dialog(parent, title, default, filters):
        asked.append((default, filters.split(";;")[0]))
        return str(tmp_path / "m.png"), ""

    from qtpy.QtWidgets import QFileDialog

    monkeypatch.setattr(QFileDialog, "getSaveFileName", dialog)
    written = widget.save_mask()
    assert asked == [(str(tmp_path / "scan_mask_race-Black_tiny.png"), "PNG (*.png)")]
    assert written == tmp_path / "m.png"
    np.testing.assert_array_equal(np.asarray(Image.open(written)), mask.data)


def test_save_mask_of_a_dicom_series_writes_seg_and_marks_edits(make_napari_viewer, qtbot, tmp_path):
    make_series(tmp_path / "ct", n=8, size=64)
    model = tiny("resunet3d-tiny", input_size=[64, 64, 64])
    model_file = save_model(tmp_path / "tiny3d.safetensors", model.network, model.spec)
    viewer = make_napari_viewer()
    [image] = viewer.open(str(tmp_path / "ct"), plugin="napari-dmoe")
    widget = dock(viewer, model_file)
    widget.attributes.set_value("race", "Black")
    run_and_wait(qtbot, widget, timeout=60000)
    [mask] = results(viewer)
    # beside the series folder, not inside it; the attribute and the model in the name
    assert sm.default_path(mask) == tmp_path / "ct_mask_race-Black_tiny3d.dcm"

    seg = hd.seg.segread(widget.save_mask(sm.default_path(mask)))
    assert {s.SegmentAlgorithmType for s in seg.SegmentSequence} == {"AUTOMATIC"}
    uids = image.metadata["sop_instance_uids"]
    back = seg.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True)
    np.testing.assert_array_equal(back, mask.data)

    mask.data[3, 10:20, 10:20] = 1  # the clinician corrects the mask
    mask.refresh()
    edited = hd.seg.segread(widget.save_mask(tmp_path / "edited.dcm"))
    assert {s.SegmentAlgorithmType for s in edited.SegmentSequence} == {"SEMIAUTOMATIC"}
    assert widget.save_mask(tmp_path / "bad.xyz") is None and not (tmp_path / "bad.xyz").exists()
