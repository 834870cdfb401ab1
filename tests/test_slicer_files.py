"""3D Slicer .seg.nrrd files (slicerio) and DICOM SEG read back: names, colours and geometry survive the trip."""
from __future__ import annotations

import shutil

import nibabel as nib
import npe2
import numpy as np
import pytest
import slicerio

from napari_dmoe.cli.main import main
from napari_dmoe.io.dicom_seg import read_dicom_seg
from napari_dmoe.io.images import read_image, write_labels
from napari_dmoe.io.slicer_seg import SEGMENT_COLORS, read_seg_nrrd, write_seg_nrrd

from test_dicom_seg import CLASSES, make_series

AFFINE = np.array([[0, 0, -3.0, 10], [-1.2, 0, 0, 5], [0, 1.5, 0, -7], [0, 0, 0, 1]])  # permuted, flipped axes


def nifti(tmp_path, data=None):
    data = np.random.default_rng(0).random((40, 30, 12)).astype("float32") if data is None else data
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(data, AFFINE), path)
    return path


def labels_for(shape):
    labels = np.zeros(shape, np.uint8)
    labels[2:6, 5:20, 3:9] = 1
    labels[-4:-1, 1:4, -7:-2] = 2
    assert set(np.unique(labels)) == {0, 1, 2}
    return labels


def assert_same_geometry(a, b):
    assert a.array.shape == b.array.shape
    np.testing.assert_allclose(a.spacing, b.spacing, atol=1e-6)
    np.testing.assert_allclose(a.origin, b.origin, atol=1e-6)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-6)


def test_seg_nrrd_round_trips_names_colours_and_geometry(tmp_path):
    volume = read_image(nifti(tmp_path))
    labels = labels_for(volume.array.shape)
    out = write_labels(tmp_path / "mask.seg.nrrd", labels, like=volume, class_names=CLASSES)
    back = read_seg_nrrd(out)
    np.testing.assert_array_equal(back.array, labels)
    assert_same_geometry(back, volume)
    assert [(s["value"], s["name"]) for s in back.meta["segments"]] == [(1, "rim"), (2, "cup")]
    assert [tuple(s["color"]) for s in back.meta["segments"]] == list(SEGMENT_COLORS[:2])
    # what Slicer reads: the voxel (i, j, k) of the file lies where the NIfTI puts the same voxel
    seg = slicerio.read_segmentation(str(out))
    assert [s["name"] for s in seg["segments"]] == ["rim", "cup"]
    ras = np.diag([-1, -1, 1, 1]) @ seg["ijkToLPS"]
    i, j, k = np.argwhere(seg["voxels"] == 2)[0]
    z, y, x = k, j, i  # our (z, y, x) array is the file's (k, j, i)
    src_voxel = np.linalg.inv(AFFINE) @ ras @ [i, j, k, 1]  # the same point in the NIfTI file's voxels
    assert labels[z, y, x] == 2
    np.testing.assert_allclose(src_voxel, np.round(src_voxel), atol=1e-6)
    assert read_image(out).array.shape == labels.shape  # read_image knows the format too


def test_seg_nrrd_in_slicer_voxel_order_reads_like_the_nifti(tmp_path):
    """Slicer writes the voxels in the volume's own order (here the NIfTI file's): we show them as our reader
    shows that NIfTI."""
    data = (np.random.default_rng(1).random((40, 30, 12)) * 3).astype(np.uint8)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    seg = {"voxels": data, "ijkToLPS": ras_to_lps @ AFFINE,
           "segments": [{"id": "s1", "labelValue": 1, "layer": 0, "name": "prostate", "color": [0.9, 0.6, 0.4]},
                        {"id": "s2", "labelValue": 2, "layer": 0, "name": "rectum", "color": [0.2, 0.4, 0.9]}]}
    slicerio.write_segmentation(str(tmp_path / "slicer.seg.nrrd"), seg)
    back = read_seg_nrrd(tmp_path / "slicer.seg.nrrd")
    like = read_image(nifti(tmp_path, data))
    np.testing.assert_array_equal(back.array, like.array)
    assert_same_geometry(back, like)
    assert back.meta["segments"][1] == {"value": 2, "name": "rectum", "color": [0.2, 0.4, 0.9]}


def test_overlapping_slicer_segments_are_refused(tmp_path):
    seg = {"voxels": np.zeros((2, 4, 4, 4), np.uint8), "ijkToLPS": np.eye(4),
           "segments": [{"id": "a", "labelValue": 1, "layer": 0, "name": "a"},
                        {"id": "b", "labelValue": 1, "layer": 1, "name": "b"}]}
    slicerio.write_segmentation(str(tmp_path / "overlap.seg.nrrd"), seg)
    with pytest.raises(ValueError, match="overlap"):
        read_seg_nrrd(tmp_path / "overlap.seg.nrrd")


@pytest.mark.slow
def test_cli_writes_seg_nrrd_with_the_model_classes(tmp_path):
    from inference_models import tiny
    from napari_dmoe.io.checkpoint import save_model

    model = tiny("resunet3d-tiny", input_size=[64, 64, 64])
    save_model(tmp_path / "m3.safetensors", model.network, model.spec)
    src = nifti(tmp_path)
    args = ["segment", str(tmp_path / "m3.safetensors"), str(src), "-a", "Black", "-q"]
    assert main([*args, "-o", str(tmp_path / "mask.seg.nrrd")]) == 0
    assert main([*args, "-o", str(tmp_path / "mask.nii.gz")]) == 0
    back = read_seg_nrrd(tmp_path / "mask.seg.nrrd")
    np.testing.assert_array_equal(back.array, read_image(tmp_path / "mask.nii.gz").array)
    assert_same_geometry(back, read_image(src))
    assert [s["name"] for s in back.meta["segments"]] == ["rim", "cup"]


def test_napari_writer_and_reader(tmp_path, registered_plugin):
    volume = read_image(nifti(tmp_path))
    from napari_dmoe.plugin.reader import layer_metadata

    labels = labels_for(volume.array.shape)
    meta = {**layer_metadata(volume), "dmoe": {"kind": "mask", "spec": {"class_names": CLASSES}}}
    out = tmp_path / "edited.seg.nrrd"
    written = npe2.write(str(out), [(labels, {"metadata": meta, "scale": volume.spacing,
                                              "translate": volume.origin}, "labels")], plugin_name="napari-dmoe")
    assert written == [str(out)]
    [(data, kwargs, kind)] = npe2.read([str(out)], stack=False, plugin_name="napari-dmoe")
    assert kind == "labels"
    np.testing.assert_array_equal(data, labels)
    np.testing.assert_allclose(kwargs["scale"], volume.spacing)
    np.testing.assert_allclose(kwargs["translate"], volume.origin)
    colors = kwargs["colormap"].color_dict
    np.testing.assert_allclose(colors[2][:3], SEGMENT_COLORS[1], atol=1e-6)
    assert [s["name"] for s in kwargs["metadata"]["segments"]] == ["rim", "cup"]
    # and saved again from napari, the names and Slicer colours stay
    again = tmp_path / "again.seg.nrrd"
    npe2.write(str(again), [(data, kwargs, "labels")], plugin_name="napari-dmoe")
    assert read_seg_nrrd(again).meta["segments"] == kwargs["metadata"]["segments"]


def test_dicom_seg_read_back_on_its_series(tmp_path, registered_plugin):
    make_series(tmp_path / "ct", n=6, size=32)
    series = read_image(tmp_path / "ct")
    labels = np.zeros(series.array.shape, np.uint8)
    labels[1, 4:10, 5:20] = 1
    labels[3, 20:30, 2:6] = 2  # slices 0, 2, 4, 5 are empty: the SEG leaves their frames out
    (tmp_path / "seg").mkdir()
    out = write_labels(tmp_path / "seg" / "mask.dcm", labels, series, class_names=CLASSES)
    back = read_dicom_seg(out)  # finds its series in the sibling folder "ct"
    np.testing.assert_array_equal(back.array, labels)
    assert_same_geometry(back, series)
    assert back.meta["class_names"] == CLASSES and not back.meta["warnings"]
    np.testing.assert_array_equal(read_dicom_seg(out, source=series).array, labels)
    [(data, kwargs, kind)] = npe2.read([str(out)], stack=False, plugin_name="napari-dmoe")
    assert kind == "labels" and np.array_equal(data, labels)
    np.testing.assert_allclose(kwargs["translate"], series.origin)

    alone = tmp_path / "elsewhere" / "inner"
    alone.mkdir(parents=True)
    shutil.copy(out, alone / "mask.dcm")
    lone = read_dicom_seg(alone / "mask.dcm")  # no series nearby: the SEG's own frames, said so
    assert "not found" in lone.meta["warnings"][0]
    assert set(np.unique(lone.array)) == {0, 1, 2}
    np.testing.assert_allclose(lone.origin[1:], series.origin[1:], atol=1e-4)


@pytest.mark.gui
def test_seg_nrrd_opens_in_napari_with_slicer_colours(make_napari_viewer, tmp_path, registered_plugin):
    volume = read_image(nifti(tmp_path))
    labels = labels_for(volume.array.shape)
    path = write_seg_nrrd(tmp_path / "from_slicer.seg.nrrd", labels, volume, class_names=["bg", "CTV", "rectum"],
                          colors=[(0.9, 0.6, 0.4), (0.2, 0.4, 0.9)])
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(path), plugin="napari-dmoe")
    assert layer._type_string == "labels"
    np.testing.assert_array_equal(layer.data, labels)
    np.testing.assert_allclose(layer.colormap.map(np.array([1, 2]))[:, :3], [(0.9, 0.6, 0.4), (0.2, 0.4, 0.9)],
                               atol=1e-6)
    np.testing.assert_allclose(layer.scale, volume.spacing)
