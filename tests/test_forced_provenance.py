""""Segment anyway" leaves a trace (issue 23 item 3): what was forced and the fit findings are in the mask layer's
metadata and in every saved format (NIfTI, .seg.nrrd, DICOM SEG, PNG/TIFF sidecar). Real viewer (xvfb), real tiny
model, real files read back with their own readers."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

if importlib.util.find_spec("napari") is None:  # a core-only install; find_spec does not import napari
    pytest.skip("napari is not installed", allow_module_level=True)

from inference_models import make_image  # noqa: E402
from test_widget_segment import dock, results, run_and_wait  # noqa: E402

pytestmark = pytest.mark.gui


def forced_mask(viewer, qtbot, widget, name):
    """Segment the image ``name`` that does not fit the model: the banner says so and the button "Segment anyway"."""
    widget.images.setCurrentText(name)
    assert widget.run_button.text() == "Segment anyway" and widget.fit_banner.findings
    findings = [f.message for f in widget.fit_banner.findings]
    run_and_wait(qtbot, widget, timeout=60000)
    [mask] = [m for m in results(viewer) if m.metadata["dmoe"]["source_layer"] == name]
    prov = mask.metadata["dmoe"]
    assert prov["forced"] is True and prov["fit_findings"] == findings
    return mask, findings


def test_forced_provenance_in_every_saved_format(make_napari_viewer, qtbot, model_path, tmp_path):
    import nibabel as nib

    from napari_dmoe.io.provenance import read_provenance, sidecar

    viewer = make_napari_viewer()
    viewer.add_image(np.stack([make_image((48, 64))] * 4), name="stack")  # a volume for a 2D model
    rgb = np.repeat(((make_image() + 2) * 60).astype(np.uint8)[..., None], 3, axis=-1)
    viewer.add_image(rgb, name="photo", rgb=True)  # colour for a grey model
    viewer.add_image(make_image(), name="fits")
    widget = dock(viewer, model_path)
    widget.attributes.set_value("race", "Black")
    mask3d, findings3d = forced_mask(viewer, qtbot, widget, "stack")
    assert any("3D volume" in f for f in findings3d)
    for name in ("m.nii.gz", "m.seg.nrrd", "m.tif"):
        viewer.layers.selection.active = mask3d
        widget.images.setCurrentText("stack")
        written = widget.save_mask(tmp_path / name)
        saved = read_provenance(written)
        assert saved["forced"] is True and saved["fit_findings"] == findings3d, name
        assert saved["attribute"] == {"race": "Black"} and saved["model"] == model_path.name, name
    assert (sidecar(tmp_path / "m.tif")).is_file()
    descrip = nib.load(str(tmp_path / "m.nii.gz")).header["descrip"].tobytes().decode().strip("\x00")
    assert descrip.endswith("FORCED") and "race=Black" in descrip  # what any NIfTI viewer shows

    mask2d, findings2d = forced_mask(viewer, qtbot, widget, "photo")
    assert any("colour" in f for f in findings2d)
    saved = read_provenance(widget.save_mask(tmp_path / "photo.png"))
    assert saved["forced"] is True and saved["fit_findings"] == findings2d

    widget.images.setCurrentText("fits")  # an image that fits: nothing forced, and the file says so
    assert widget.run_button.text() == "Segment"
    widget.attributes.set_value("race", "Black")  # each image its own values: a new one starts "unknown"
    run_and_wait(qtbot, widget)
    saved = read_provenance(widget.save_mask(tmp_path / "fits.png"))
    assert saved["forced"] is False and saved["fit_findings"] == [] and saved["attribute"] == {"race": "Black"}


def test_forced_provenance_in_a_dicom_seg(make_napari_viewer, qtbot, model_path, tmp_path):
    import highdicom as hd

    from napari_dmoe.io.provenance import read_provenance
    from test_dicom_seg import make_series

    make_series(tmp_path / "ct", n=4, size=64)
    viewer = make_napari_viewer()
    viewer.open(str(tmp_path / "ct"), plugin="napari-dmoe")
    widget = dock(viewer, model_path)  # a 2D fundus-like model on a CT series: does not fit
    widget.attributes.set_value("race", "White")
    mask, findings = forced_mask(viewer, qtbot, widget, "ct")
    written = widget.save_mask(tmp_path / "ct_seg.dcm")
    seg = hd.seg.segread(written)
    assert seg.SeriesDescription.startswith("dMoE SEG FORCED") and "FORCED" in seg.ContentDescription
    saved = read_provenance(written)
    assert saved["forced"] is True and saved["attribute"] == "race=White"
    assert len(saved["fit_findings"]) == len(findings) and "3D volume" in saved["fit_findings"][0]
