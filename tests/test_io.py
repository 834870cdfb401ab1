"""read_image / write_labels on real files: pydicom and nibabel test data plus files written here."""
from __future__ import annotations

import random
from pathlib import Path

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
from nibabel.testing import data_path
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from napari_dmoe.io.images import ImageReadError, ImageWriteError, Volume, read_image, write_labels

CT = get_testdata_file("CT_small.dcm")
MR = get_testdata_file("MR_small.dcm")


def world_by_value(vol: Volume) -> dict[int, np.ndarray]:
    """Voxel value -> RAS world position through the volume's (z, y, x) affine (values must be unique)."""
    out = {}
    for idx in np.ndindex(vol.array.shape):
        out[int(vol.array[idx])] = (vol.affine @ np.array([*idx, 1.0]))[:3]
    return out


def file_world_by_value(path: Path) -> dict[int, np.ndarray]:
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
    return {int(data[idx]): (img.affine @ np.array([*idx, 1.0]))[:3] for idx in np.ndindex(data.shape)}


# -- DICOM single files -----------------------------------------------------------------------------------
def test_ct_small_rescaled_with_spacing():
    vol = read_image(CT)
    ds = pydicom.dcmread(CT)
    assert vol.array.shape == (128, 128)
    np.testing.assert_array_equal(vol.array, ds.pixel_array.astype(np.int32) * 1 - 1024)
    assert vol.spacing == pytest.approx((0.661468, 0.661468))
    assert vol.meta["modality"] == "CT" and vol.meta["format"] == "dicom"
    assert vol.origin == pytest.approx((-179.035797, -158.135803))  # (y, x): column then row direction


def test_mr_small_without_rescale():
    vol = read_image(MR)
    np.testing.assert_array_equal(vol.array, pydicom.dcmread(MR).pixel_array)
    assert vol.spacing == pytest.approx((0.3125, 0.3125))
    assert vol.meta["modality"] == "MR"


def test_dicom_without_pixel_data(tmp_path):
    ds = pydicom.dcmread(CT)
    del ds.PixelData
    ds.save_as(tmp_path / "nopixels.dcm")
    with pytest.raises(ImageReadError, match="no pixel data"):
        read_image(tmp_path / "nopixels.dcm")


def test_corrupt_dicom(tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not a dicom file at all" * 10)
    with pytest.raises(ImageReadError, match="bad.dcm"):
        read_image(bad)


# -- DICOM series -----------------------------------------------------------------------------------------
def write_slice(path: Path, series_uid: str, z: float, value: int, instance: int, *, slope=2.0, intercept=-100.0,
                orientation=(1, 0, 0, 0, 1, 0), size=(128, 128)) -> None:
    ds = pydicom.dcmread(CT)
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = generate_uid()
    ds.ImagePositionPatient = [-158.0, -179.0, z]
    ds.ImageOrientationPatient = list(orientation)
    ds.InstanceNumber = instance
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.Rows, ds.Columns = size
    ds.PixelData = np.full(size, value, dtype=np.int16).tobytes()
    ds.save_as(path)


def make_series(folder: Path, n: int = 5, gap: float = 2.5, **kw) -> str:
    uid = generate_uid()
    order = list(range(n))
    random.Random(0).shuffle(order)  # file names and instance numbers say nothing about the position
    for name_idx, k in enumerate(order):
        write_slice(folder / f"f{name_idx:02d}.dcm", uid, z=10.0 + k * gap, value=k * 10, instance=n - k, **kw)
    return uid


def test_dicom_series_sorted_rescaled_and_spaced(tmp_path):
    uid = make_series(tmp_path)
    other = generate_uid()
    for i in range(2):
        write_slice(tmp_path / f"other{i}.dcm", other, z=float(i), value=7, instance=i)
    (tmp_path / "README.txt").write_text("not dicom")
    vol = read_image(tmp_path)
    assert vol.array.shape == (5, 128, 128)
    # slice k has raw value 10k, slope 2, intercept -100
    np.testing.assert_array_equal(vol.array[:, 0, 0], [2 * 10 * k - 100 for k in range(5)])
    assert vol.spacing == pytest.approx((2.5, 0.661468, 0.661468))
    assert vol.meta["series_uid"] == uid
    assert vol.meta["other_series"] == [{"series_uid": other, "n_slices": 2}]
    assert any("2 series" in w and other in w for w in vol.meta["warnings"])
    assert vol.meta["n_files_skipped"] == 1
    assert vol.origin[0] == pytest.approx(10.0)
    # affine: index (z, y, x) -> RAS; DICOM LPS x,y flip sign
    np.testing.assert_allclose(vol.affine @ [1, 0, 0, 1], [158.0, 179.0, 12.5, 1.0])


def test_dicom_series_sorted_along_slice_normal(tmp_path):
    # column direction -y makes the normal -z: slices run from high z to low z
    make_series(tmp_path, orientation=(1, 0, 0, 0, -1, 0))
    vol = read_image(tmp_path)
    np.testing.assert_array_equal(vol.array[:, 0, 0], [2 * 10 * k - 100 for k in range(5)][::-1])
    assert vol.spacing[0] == pytest.approx(2.5)


def test_dicom_series_inconsistent_slice_sizes(tmp_path):
    uid = make_series(tmp_path, n=3)
    write_slice(tmp_path / "odd.dcm", uid, z=17.5, value=1, instance=9, size=(64, 64))  # the next position
    with pytest.raises(ImageReadError, match="odd.dcm.*differs"):
        read_image(tmp_path)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImageReadError, match="no DICOM images"):
        read_image(tmp_path)


def test_dicom_series_labels_to_nifti_keep_world_positions(tmp_path):
    make_series(tmp_path, n=3)
    vol = read_image(tmp_path)
    small = Volume(array=vol.array[:, :4, :5], spacing=vol.spacing, origin=vol.origin, affine=vol.affine, meta={})
    labels = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5)
    small.array = labels
    out = write_labels(tmp_path / "labels.nii.gz", labels, like=small)
    expected = world_by_value(small)
    got = file_world_by_value(out)
    assert set(got) == set(expected)
    for value, pos in expected.items():
        np.testing.assert_allclose(got[value], pos, atol=1e-4)


# -- NIfTI ------------------------------------------------------------------------------------------------
def test_nibabel_anatomical_canonical_and_round_trip(tmp_path):
    src = data_path / "anatomical.nii"
    vol = read_image(src)
    img = nib.load(src)
    canonical = np.asanyarray(nib.as_closest_canonical(img).dataobj)  # RAS+; we show LPS+ (x and y flipped)
    np.testing.assert_array_equal(vol.array, canonical[::-1, ::-1, :].transpose(2, 1, 0))
    assert vol.spacing == (2.0, 2.0, 2.0)
    assert vol.meta["source_orientation"] == "LAS" and vol.meta["orientation"] == "LPS"
    assert vol.array.dtype.isnative
    out = write_labels(tmp_path / "anat_labels.nii.gz", (vol.array > 50).astype(np.uint8), like=vol)
    back = nib.load(out)
    np.testing.assert_array_equal(back.affine, img.affine)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), (np.asanyarray(img.dataobj) > 50).astype(np.uint8))


def flipped_permuted_affine() -> np.ndarray:
    """Voxel axes (i, j, k) -> world (-z, -x, y) style: LPS-like flips and an axis permutation."""
    affine = np.zeros((4, 4))
    affine[0, 1] = -0.5   # j -> -x (left)
    affine[1, 2] = 0.8    # k -> +y
    affine[2, 0] = -2.5   # i -> -z
    affine[:3, 3] = [12.0, -30.0, 40.0]
    affine[3, 3] = 1
    return affine


def test_nifti_non_unit_spacing_flipped_affine(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    affine = flipped_permuted_affine()
    src = tmp_path / "lps.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), src)
    vol = read_image(src)
    # canonical LPS: x <- j (5 voxels, 0.5 mm), y <- k (6, 0.8 mm), z <- i (4, 2.5 mm); napari order (z, y, x)
    assert vol.array.shape == (4, 6, 5)
    assert vol.spacing == pytest.approx((2.5, 0.8, 0.5))
    # every voxel keeps its world position
    expected = file_world_by_value(src)
    for value, pos in world_by_value(vol).items():
        np.testing.assert_allclose(pos, expected[value], atol=1e-5)
    # translate is the LPS world position of voxel 0 in (z, y, x) order
    np.testing.assert_allclose(vol.origin[::-1], (vol.affine @ [0, 0, 0, 1])[:3] * [-1, -1, 1])
    # and the array runs along +L, +P, +S: one step along an axis moves by +spacing in LPS
    lps = np.diag([-1, -1, 1, 1]) @ vol.affine
    np.testing.assert_allclose(np.diag(lps[:3, :3][:, ::-1]), vol.spacing[::-1], atol=1e-6)  # columns are (z, y, x)
    out = write_labels(tmp_path / "lps_labels.nii", vol.array.astype(np.uint8), like=vol)
    back = nib.load(out)
    np.testing.assert_array_equal(back.affine, nib.load(src).affine)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), data.astype(np.uint8))


def test_oblique_nifti_warns_and_round_trips(tmp_path):
    theta = np.deg2rad(30)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine[:3, :3] = rot @ affine[:3, :3]
    data = np.arange(3 * 4 * 2, dtype=np.uint8).reshape(3, 4, 2)
    src = tmp_path / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), src)
    vol = read_image(src)
    assert any("oblique" in w for w in vol.meta["warnings"])
    out = write_labels(tmp_path / "oblique_labels.nii.gz", vol.array, like=vol)
    back = nib.load(out)
    np.testing.assert_array_equal(back.affine, nib.load(src).affine)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), data)


def test_nifti_4d_singleton_and_real_4d(tmp_path):
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4, 1)
    src = tmp_path / "single.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 3.0, 4.0, 1.0])), src)
    vol = read_image(src)
    assert vol.array.shape == (4, 3, 2) and vol.spacing == (4.0, 3.0, 2.0)
    back = nib.load(write_labels(tmp_path / "single_labels.nii.gz", vol.array, like=vol))
    assert back.shape == (2, 3, 4, 1)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), data)
    with pytest.raises(ImageReadError, match="2D or 3D images only"):
        read_image(data_path / "example4d.nii.gz")


def test_corrupt_nifti(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ImageReadError, match="bad.nii.gz.*NIfTI"):
        read_image(bad)


# -- PNG / JPG / TIFF -------------------------------------------------------------------------------------
def test_plain_images(tmp_path):
    grey = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    iio.imwrite(tmp_path / "grey.png", grey)
    vol = read_image(tmp_path / "grey.png")
    np.testing.assert_array_equal(vol.array, grey)
    assert vol.spacing == (1.0, 1.0) and not vol.rgb and vol.meta["spacing_known"] is False
    rgba = np.zeros((6, 7, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    iio.imwrite(tmp_path / "rgba.png", rgba)
    vol = read_image(tmp_path / "rgba.png")
    assert vol.array.shape == (6, 7, 3) and vol.rgb and vol.spatial_shape == (6, 7)
    assert "alpha channel dropped" in vol.meta["warnings"]
    iio.imwrite(tmp_path / "photo.jpg", rgba[..., :3])
    vol = read_image(tmp_path / "photo.jpg")
    assert vol.array.shape == (6, 7, 3) and abs(int(vol.array[..., 0].mean()) - 200) < 5


def test_tiff_stack_and_rgb(tmp_path):
    stack = np.arange(4 * 8 * 9, dtype=np.uint16).reshape(4, 8, 9)
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    vol = read_image(tmp_path / "stack.tif")
    np.testing.assert_array_equal(vol.array, stack)
    assert vol.spacing == (1.0, 1.0, 1.0)
    rgb = np.zeros((8, 9, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tiff", rgb, photometric="rgb")
    vol = read_image(tmp_path / "rgb.tiff")
    assert vol.rgb and vol.array.shape == (8, 9, 3)


def test_corrupt_png_and_tiff(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "bad.tif").write_bytes(b"II*\x00 junk")
    with pytest.raises(ImageReadError, match="bad.png"):
        read_image(tmp_path / "bad.png")
    with pytest.raises(ImageReadError, match="bad.tif.*TIFF"):
        read_image(tmp_path / "bad.tif")


def test_missing_and_unsupported(tmp_path):
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "nope.nii.gz")
    (tmp_path / "table.xyz").write_text("1,2,3")
    with pytest.raises(ImageReadError, match="unsupported file type '.xyz'"):
        read_image(tmp_path / "table.xyz")


# -- writing 2D -------------------------------------------------------------------------------------------
def test_write_png_tiff_labels(tmp_path):
    labels = np.zeros((5, 6), dtype=np.int64)
    labels[1:3, 2:4] = 2
    out = write_labels(tmp_path / "l.png", labels)
    back = iio.imread(out)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, labels)
    labels[0, 0] = 300
    back = tifffile.imread(write_labels(tmp_path / "l.tif", labels))
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, labels)


def test_write_errors(tmp_path):
    like = read_image(MR)
    with pytest.raises(ImageWriteError, match="spatial shape"):
        write_labels(tmp_path / "x.png", np.zeros((3, 3), np.uint8), like=like)
    with pytest.raises(ImageWriteError, match="PNG holds 2D"):
        write_labels(tmp_path / "x.png", np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(ImageWriteError, match="non-negative integers"):
        write_labels(tmp_path / "x.png", -np.ones((3, 3)))
    with pytest.raises(ImageWriteError, match="'.jpg'"):
        write_labels(tmp_path / "x.jpg", np.zeros((3, 3), np.uint8))
    with pytest.raises(ImageWriteError, match="does not exist"):
        write_labels(tmp_path / "missing" / "x.png", np.zeros((3, 3), np.uint8))


@pytest.mark.parametrize("shape, spacing, origin", [((4, 5, 6), (3.0, 1.5, 0.5), (10.0, -20.0, 7.5)),
                                                    ((5, 6), (0.8, 0.4), (1.0, 2.0))])
def test_labels_without_source_geometry_read_back_unchanged(tmp_path, shape, spacing, origin):
    """A TIFF-born volume (spacing from the napari layer, no affine) written as NIfTI reads back as the same
    array, voxel size and LPS origin: no axis is flipped on the way."""
    from napari_dmoe.io.images import Volume, read_image, write_labels

    labels = np.arange(np.prod(shape), dtype=np.uint8).reshape(shape) % 7
    like = Volume(array=labels, spacing=spacing, origin=origin, affine=None, meta={})
    back = read_image(write_labels(tmp_path / "labels.nii.gz", labels, like=like))
    np.testing.assert_array_equal(back.array.reshape(shape), labels)
    assert back.spacing[-len(spacing):] == pytest.approx(spacing)
    assert back.origin[-len(origin):] == pytest.approx(origin)
    plain = read_image(write_labels(tmp_path / "plain.nii.gz", labels))  # no geometry at all: unit voxels
    np.testing.assert_array_equal(plain.array.reshape(shape), labels)
