"""DICOM SEG export: segments, source references per plane, pixel data, CLI and writer paths, error messages."""
from __future__ import annotations

import random
from pathlib import Path

import highdicom as hd
import npe2
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from napari_dmoe.io.checkpoint import save_model
from napari_dmoe.cli.main import main
from napari_dmoe.io.dicom_seg import SegAlgorithm, write_dicom_seg
from napari_dmoe.io.images import ImageWriteError, read_image, write_labels, write_volume

from inference_models import tiny

CT = get_testdata_file("CT_small.dcm")
CLASSES = ["background", "rim", "cup"]


def make_series(folder: Path, n: int = 5, size: int = 32, orientation=(1, 0, 0, 0, 1, 0)) -> dict[float, str]:
    """CT slices written in shuffled file order; returns slice position (mm along z) -> SOPInstanceUID."""
    folder.mkdir()
    uid, by_z = generate_uid(), {}
    order = list(range(n))
    random.Random(3).shuffle(order)  # file names say nothing about the position
    for name_idx, k in enumerate(order):
        ds = pydicom.dcmread(CT)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, generate_uid()
        ds.ImagePositionPatient = [-158.0, -179.0, 10.0 + 2.5 * k]
        ds.ImageOrientationPatient = list(orientation)
        ds.InstanceNumber = name_idx + 1
        ds.Rows = ds.Columns = size
        ds.PixelData = np.full((size, size), 10 * k, np.int16).tobytes()
        ds.save_as(folder / f"f{name_idx:02d}.dcm")
        by_z[10.0 + 2.5 * k] = ds.SOPInstanceUID
    assert order != sorted(order)
    return by_z


def frames_by_plane(seg: pydicom.Dataset, uid_to_plane: dict[str, int]) -> dict[tuple[int, int], np.ndarray]:
    """(plane, segment number) -> binary frame, from the SEG's own per-frame references."""
    out = {}
    for i, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        [src] = frame.DerivationImageSequence[0].SourceImageSequence
        number = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        out[(uid_to_plane[src.ReferencedSOPInstanceUID], number)] = seg.pixel_array.reshape(
            -1, seg.Rows, seg.Columns)[i]
    return out


@pytest.mark.parametrize("orientation", [(1, 0, 0, 0, 1, 0), (1, 0, 0, 0, -1, 0)])  # normal +z and -z
def test_seg_frames_reference_the_right_source_slices(tmp_path, orientation):
    by_z = make_series(tmp_path / "ct", orientation=orientation)
    vol = read_image(tmp_path / "ct")
    # independent of the reader's bookkeeping: plane z shows the slice of raw value 10k (rescaling keeps the
    # order), which lies at 10 + 2.5k mm
    ks = np.argsort(np.argsort(vol.array[:, 0, 0]))
    assert list(ks) == (list(range(5)) if orientation[4] == 1 else list(range(5))[::-1])
    plane_uids = [by_z[10.0 + 2.5 * k] for k in ks]
    assert plane_uids == vol.meta["sop_instance_uids"]
    labels = np.zeros(vol.array.shape, np.uint8)
    labels[1, 4:10, 5:20] = 1
    labels[3, 20:30, 2:6] = 2
    labels[3, 0:3, 0:3] = 1
    out = write_labels(tmp_path / "seg.dcm", labels, vol, class_names=CLASSES,
                       algorithm=SegAlgorithm(model="m.safetensors", attribute="race=Black"))
    seg = pydicom.dcmread(out)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["rim", "cup"]
    assert {s.SegmentAlgorithmType for s in seg.SegmentSequence} == {"AUTOMATIC"}
    ident = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert ident.AlgorithmName == "napari-dmoe" and "m.safetensors" in ident.AlgorithmParameters
    assert "m race=Black" in seg.SeriesDescription
    frames = frames_by_plane(seg, {u: z for z, u in enumerate(plane_uids)})
    assert set(frames) == {(1, 1), (3, 1), (3, 2)}  # empty frames omitted
    for (z, number), frame in frames.items():
        np.testing.assert_array_equal(frame, labels[z] == number)
    # and highdicom, reading it as a clinical viewer would, gives our label map back per source instance
    back = hd.seg.segread(out).get_pixels_by_source_instance(plane_uids, combine_segments=True)
    np.testing.assert_array_equal(back, labels)


def test_cli_segment_series_to_dicom_seg(tmp_path, capsys):
    make_series(tmp_path / "ct", n=8, size=64)
    model = tiny("resunet3d-tiny", input_size=[64, 64, 64])
    save_model(tmp_path / "tiny3d.safetensors", model.network, model.spec)
    args = ["segment", str(tmp_path / "tiny3d.safetensors"), str(tmp_path / "ct"), "-a", "Black", "-q"]
    assert main([*args, "-o", str(tmp_path / "mask.dcm")]) == 0
    assert main([*args, "-o", str(tmp_path / "mask.nii.gz")]) == 0
    vol = read_image(tmp_path / "ct")
    expected = read_image(tmp_path / "mask.nii.gz").array  # same CLI run, written as NIfTI in the same geometry
    seg = hd.seg.segread(tmp_path / "mask.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["rim", "cup"]
    assert seg.SeriesDescription == "dMoE SEG tiny3d race=Black"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == vol.meta["series_uid"]
    back = seg.get_pixels_by_source_instance(vol.meta["sop_instance_uids"], combine_segments=True,
                                             skip_overlap_checks=True)
    np.testing.assert_array_equal(back, expected)
    assert set(np.unique(expected)) == {0, 1, 2}  # the tiny model gives every class here: a real check


def test_non_dicom_source_refused_before_inference(tmp_path, capsys):
    write_volume(tmp_path / "ct.nii.gz", np.zeros((4, 8, 8), np.float32), (2.0, 1.0, 1.0))
    vol = read_image(tmp_path / "ct.nii.gz")
    with pytest.raises(ImageWriteError, match=r"DICOM SEG \(.dcm\) needs labels made on a DICOM.*\.nii\.gz"):
        write_labels(tmp_path / "x.dcm", np.zeros((4, 8, 8), np.uint8), vol)
    with pytest.raises(ImageWriteError, match="DICOM SEG"):
        write_labels(tmp_path / "x.dcm", np.zeros((4, 8, 8), np.uint8))
    model = tiny("resunet3d-tiny", input_size=[64, 64, 64])
    save_model(tmp_path / "m.safetensors", model.network, model.spec)
    code = main(["segment", str(tmp_path / "m.safetensors"), str(tmp_path / "ct.nii.gz"),
                 "-o", str(tmp_path / "x.dcm")])
    err = capsys.readouterr().err
    assert code == 2 and "needs labels made on a DICOM" in err and "Traceback" not in err
    assert not (tmp_path / "x.dcm").exists()


def test_shape_mismatch_and_missing_source_file(tmp_path):
    make_series(tmp_path / "ct", n=3)
    vol = read_image(tmp_path / "ct")
    with pytest.raises(ImageWriteError, match=r"labels have shape \(2, 32, 32\).*\(3, 32, 32\)"):
        write_labels(tmp_path / "x.dcm", np.zeros((2, 32, 32), np.uint8), vol)
    with pytest.raises(ImageWriteError, match=r"labels have shape \(3, 16, 32\).*\(3, 32, 32\)"):
        write_dicom_seg(tmp_path / "x.dcm", np.zeros((3, 16, 32), np.uint8), vol.meta["files"], ["bg", "a"])
    Path(vol.meta["files"][1]).unlink()
    with pytest.raises(ImageWriteError, match="is gone"):
        write_labels(tmp_path / "x.dcm", np.ones((3, 32, 32), np.uint8), vol)
    assert not list(tmp_path.glob("*.dcm")) and not list(tmp_path.glob(".*tmp"))


def test_napari_writer_and_single_2d_file(tmp_path, registered_plugin):
    [(image, kwargs, _)] = npe2.read([CT], plugin_name="napari-dmoe", stack=False)
    labels = np.zeros(image.shape, np.uint8)
    labels[10:20, 30:40] = 2
    meta = {**kwargs["metadata"], "dmoe": {"kind": "mask", "model": "/models/fundus.safetensors",
                                           "attribute_used": {"race": "White"}, "spec": {"class_names": CLASSES}}}
    out = tmp_path / "l.dcm"
    assert npe2.write(str(out), [(labels, {"metadata": meta}, "labels")], plugin_name="napari-dmoe") == [str(out)]
    seg = hd.seg.segread(out)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["rim", "cup"]
    assert seg.SeriesDescription == "dMoE SEG fundus race=White"
    [uid] = read_image(CT).meta["sop_instance_uids"]
    back = seg.get_pixels_by_source_instance([uid], combine_segments=True)
    np.testing.assert_array_equal(back[0], labels)


def test_seg_says_whether_a_person_edited_or_drew_the_mask(tmp_path, registered_plugin):
    """AUTOMATIC for the model's mask as made, SEMIAUTOMATIC once the user edited it (its data no longer match
    the digest stored at creation), MANUAL for labels drawn by hand, which name no algorithm."""
    from napari_dmoe.plugin.results import DIGEST_KEY, data_digest

    [(image, kwargs, _)] = npe2.read([CT], plugin_name="napari-dmoe", stack=False)
    made = np.zeros(image.shape, np.uint8)
    made[10:20, 30:40] = 1
    prov = {"kind": "mask", "model": "/m/fundus.safetensors", "attribute_used": {"race": "Black"},
            "spec": {"class_names": CLASSES}, DIGEST_KEY: data_digest(made)}
    meta = {**kwargs["metadata"], "dmoe": prov}

    def algorithm_type(labels, metadata, name):
        out = tmp_path / name
        npe2.write(str(out), [(labels, {"metadata": metadata}, "labels")], plugin_name="napari-dmoe")
        seg = hd.seg.segread(out)
        return {s.SegmentAlgorithmType for s in seg.SegmentSequence}, seg

    kinds, seg = algorithm_type(made, meta, "auto.dcm")
    assert kinds == {"AUTOMATIC"} and seg.SeriesDescription == "dMoE SEG fundus race=Black"
    edited = made.copy()
    edited[25:30, 30:40] = 1  # the user painted more lesion
    kinds, seg = algorithm_type(edited, meta, "edited.dcm")
    assert kinds == {"SEMIAUTOMATIC"} and seg.SeriesDescription.endswith("edited")
    assert all(s.SegmentAlgorithmName == "napari-dmoe" for s in seg.SegmentSequence)
    kinds, seg = algorithm_type(edited, dict(kwargs["metadata"]), "drawn.dcm")  # no dmoe provenance: drawn by hand
    assert kinds == {"MANUAL"} and not any("SegmentAlgorithmName" in s for s in seg.SegmentSequence)


def test_batch_writes_dicom_seg_for_dicom_inputs_only(tmp_path, capsys):
    """--dicom-seg: a series folder gets <name>_labels.dcm; a NIfTI case in the same batch stays .nii.gz."""
    (tmp_path / "cases").mkdir()
    make_series(tmp_path / "cases" / "ct1", n=8, size=64)
    write_volume(tmp_path / "cases" / "vol2.nii.gz", np.random.default_rng(0).normal(0, 50, (8, 64, 64)),
                 (2.5, 1.0, 1.0))
    (tmp_path / "cases.csv").write_text("image,race\nct1,Black\nvol2.nii.gz,White\n")
    model = tiny("resunet3d-tiny", input_size=[64, 64, 64])
    save_model(tmp_path / "tiny3d.safetensors", model.network, model.spec)
    assert main(["segment", str(tmp_path / "tiny3d.safetensors"), str(tmp_path / "cases"), "--csv",
                 str(tmp_path / "cases.csv"), "-o", str(tmp_path / "out"), "--dicom-seg", "-q"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ct1_labels.dcm", "vol2_labels.nii.gz"]
    seg = hd.seg.segread(tmp_path / "out" / "ct1_labels.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == read_image(tmp_path / "cases" / "ct1").meta["series_uid"]
