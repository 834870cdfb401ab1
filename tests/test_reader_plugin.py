"""npe2 reader / writer contributions: direct calls, through npe2, and in a real viewer."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import npe2
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from napari_dmoe.plugin.reader import napari_get_reader
from napari_dmoe.io.images import read_image

CT = get_testdata_file("CT_small.dcm")


pytestmark = pytest.mark.usefixtures("registered_plugin")  # conftest: discover our manifest once


def write_nifti(path, spacing=(0.7, 0.9, 3.0)):
    data = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # LPS-like voxel axes
    affine[:3, 3] = [20.0, 10.0, -5.0]
    nib.save(nib.Nifti1Image(data, affine), path)
    return data, affine


def write_series(folder, n=3):
    folder.mkdir()
    uid = generate_uid()
    for k in range(n):
        ds = pydicom.dcmread(CT)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, generate_uid()
        ds.ImagePositionPatient = [0.0, 0.0, 4.0 * k]
        ds.save_as(folder / f"slice{k}.dcm")
    return folder


def test_get_reader_nifti_layer_tuple(tmp_path):
    path = tmp_path / "ct.nii.gz"
    write_nifti(path)
    reader = napari_get_reader(str(path))
    assert callable(reader)
    [(data, kwargs, layer_type)] = reader(str(path))
    vol = read_image(path)
    assert layer_type == "image"
    np.testing.assert_array_equal(data, vol.array)
    assert kwargs["scale"] == pytest.approx((3.0, 0.9, 0.7))
    assert kwargs["translate"] == pytest.approx(vol.origin)
    assert "affine" not in kwargs  # napari-nninteractive#10: never hand the affine to add_image
    assert kwargs["metadata"]["source"] == str(path)
    assert kwargs["metadata"]["spacing"] == pytest.approx([3.0, 0.9, 0.7])
    assert kwargs["metadata"]["warnings"] == []


def test_get_reader_declines_what_it_does_not_read(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.txt").write_text("x")
    assert napari_get_reader(str(tmp_path / "plain")) is None  # other readers may try folders
    assert napari_get_reader(str(tmp_path / "img.png")) is None
    assert napari_get_reader([str(tmp_path / "a.nii"), str(tmp_path / "b.nii")]) is None


def test_dicom_folder_through_npe2(tmp_path):
    folder = write_series(tmp_path / "series")
    layers = npe2.read([str(folder)], plugin_name="napari-dmoe", stack=False)
    [(data, kwargs, layer_type)] = layers
    assert data.shape == (3, 128, 128) and layer_type == "image"
    assert kwargs["scale"] == pytest.approx((4.0, 0.661468, 0.661468))
    assert kwargs["metadata"]["modality"] == "CT"


def test_selected_dicom_files_read_as_one_series(tmp_path):
    folder = write_series(tmp_path / "series", n=4)
    chosen = [str(folder / f"slice{k}.dcm") for k in (3, 1, 2)]
    [(data, kwargs, _)] = napari_get_reader(chosen)(chosen)
    assert data.shape == (3, 128, 128) and kwargs["name"] == "series"
    assert kwargs["metadata"]["files"] == [str(folder / f"slice{k}.dcm") for k in (1, 2, 3)]
    assert kwargs["scale"][0] == pytest.approx(4.0)
    gap = [str(folder / f"slice{k}.dcm") for k in (3, 0, 2)]  # 8 and 4 mm: slice 1 is missing
    with pytest.raises(ValueError, match="not evenly spaced"):  # issue 12: never stacked as if contiguous
        napari_get_reader(gap)(gap)


def test_writer_refuses_labels_from_another_image(tmp_path):
    src = tmp_path / "img.nii.gz"
    write_nifti(src)
    [(_, kwargs, _)] = npe2.read([str(src)], plugin_name="napari-dmoe", stack=False)
    with pytest.raises(ValueError, match="do not fit the source image"):
        npe2.write(str(tmp_path / "l.nii.gz"), [(np.zeros((2, 2, 2), np.uint8), kwargs, "labels")],
                   plugin_name="napari-dmoe")


def test_labels_written_through_npe2_restore_source_geometry(tmp_path):
    src = tmp_path / "img.nii.gz"
    data, affine = write_nifti(src)
    [(image, kwargs, _)] = npe2.read([str(src)], plugin_name="napari-dmoe", stack=False)
    labels = (image % 3).astype(np.uint8)
    out = tmp_path / "img_labels.nii.gz"
    written = npe2.write(str(out), [(labels, {"metadata": kwargs["metadata"], "scale": kwargs["scale"]}, "labels")],
                         plugin_name="napari-dmoe")
    assert written == [str(out)]
    back = nib.load(out)
    np.testing.assert_array_equal(back.affine, nib.load(src).affine)  # the header stores float32
    np.testing.assert_allclose(back.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), (data % 3).astype(np.uint8))


def test_writer_without_metadata_uses_scale_and_translate(tmp_path):
    labels = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    out = tmp_path / "plain.nii"
    npe2.write(str(out), [(labels, {"scale": (3.0, 2.0, 0.5), "translate": (1.0, 2.0, 3.0)}, "labels")],
               plugin_name="napari-dmoe")
    back = nib.load(out)
    assert back.shape == (4, 3, 2)
    np.testing.assert_allclose(back.header.get_zooms(), (0.5, 2.0, 3.0))
    # a layer's translate is the LPS position of its first voxel, as our reader sets it: RAS x and y flip sign
    np.testing.assert_allclose(back.affine[:3, 3], (-3.0, -2.0, 1.0))
    [(data, kwargs, _)] = napari_get_reader(str(out))(str(out))  # and opening it again gives the same layer
    np.testing.assert_array_equal(data, labels)
    np.testing.assert_allclose(kwargs["scale"], (3.0, 2.0, 0.5))
    np.testing.assert_allclose(kwargs["translate"], (1.0, 2.0, 3.0))


@pytest.mark.gui
def test_open_in_viewer(make_napari_viewer, tmp_path):
    path = tmp_path / "scan.nii.gz"
    write_nifti(path)
    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin="napari-dmoe")
    assert len(layers) == 1
    np.testing.assert_allclose(layers[0].scale, (3.0, 0.9, 0.7))
    folder = write_series(tmp_path / "series")
    [layer] = viewer.open(str(folder), plugin="napari-dmoe")
    np.testing.assert_allclose(layer.scale, (4.0, 0.661468, 0.661468))
    assert layer.data.shape == (3, 128, 128)
    # save labels drawn on the NIfTI image, the way a user does: File > Save Selected Layers
    labels = viewer.add_labels((layers[0].data > 50).astype(np.uint8), scale=layers[0].scale,
                               metadata=dict(layers[0].metadata))
    viewer.layers.selection = {labels}
    out = tmp_path / "scan_labels.nii.gz"
    saved = viewer.layers.save(str(out), selected=True, plugin="napari-dmoe")
    assert saved == [str(out)]
    np.testing.assert_array_equal(nib.load(out).affine, nib.load(path).affine)


def test_label_files_open_as_labels(tmp_path):
    path = tmp_path / "case_label.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((3, 4, 5), np.uint8), np.eye(4)), path)
    [(data, kwargs, layer_type)] = napari_get_reader(str(path))(str(path))
    assert layer_type == "labels" and data.shape == (5, 4, 3) and "colormap" not in kwargs


def test_plugin_modules_import_without_torch_or_nibabel():
    import subprocess
    import sys

    code = ("import sys, napari_dmoe.plugin.reader, napari_dmoe.plugin.writer; "
            "bad = [m for m in ('torch', 'nibabel', 'pydicom', 'monai') if m in sys.modules]; "
            "sys.exit(f'imported at plugin load: {bad}' if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_manifest_reader_and_writer_equal_the_format_table():
    """napari.yaml states the formats a second time (npe2 needs it there): it must say what io/formats.py says."""
    import yaml

    from napari_dmoe.io.formats import reader_patterns, writer_extensions

    manifest = yaml.safe_load((Path(__file__).resolve().parents[1] / "napari_dmoe" / "napari.yaml").read_text())
    (reader,) = manifest["contributions"]["readers"]
    (writer,) = manifest["contributions"]["writers"]
    assert sorted(reader["filename_patterns"]) == sorted(reader_patterns())
    assert sorted(writer["filename_extensions"]) == sorted(writer_extensions())


def test_one_default_mask_format_rule():
    from napari_dmoe.io.formats import default_mask_suffix, dialog_filters, format_of

    assert default_mask_suffix("dicom", 3, dicom_files=True) == ".dcm"  # the save dialog beside a series
    assert default_mask_suffix("dicom", 3) == default_mask_suffix("dicom", 2) == ".nii.gz"  # the CLI's routing maps
    assert default_mask_suffix("png", 2) == ".png" and default_mask_suffix(None, 3) == ".nii.gz"
    assert format_of("a/scan.SEG.NRRD").name == "3D Slicer segmentation" and format_of("x.nrrd") is None
    assert dialog_filters(".nii.gz").startswith("NIfTI (*.nii.gz *.nii);;") and "*.seg.nrrd" in dialog_filters(".png")
