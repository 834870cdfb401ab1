"""Issue 12, silently wrong results: each becomes a correct result with a note, or a refusal naming the file and
the field: 16-bit images, DICOM series with gaps, broken NIfTI geometry, conflicting attributes, NaN models."""
from __future__ import annotations

import dataclasses
import json
import math

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from napari_dmoe.inference.engine import segment
from napari_dmoe.io.checkpoint import CheckpointError, load_model, save_model
from napari_dmoe.io.images import ImageReadError, read_image
from napari_dmoe.model import build_network

from inference_models import make_image, tiny
from test_dicom_seg import make_series


# -- 16-bit images ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scale_model():
    """A model trained on 8-bit images (normalization: divide by 255), as the fundus and skin demos are."""
    return tiny("transunet2d-tiny", normalization={"kind": "scale", "factor": 255})


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_image_is_read_at_its_own_bit_depth(scale_model, tmp_path, suffix):
    img8 = ((make_image((64, 64)) + 2) / 4 * 255).clip(0, 255).astype(np.uint8)
    path = tmp_path / f"img16{suffix}"
    (iio.imwrite if suffix == ".png" else tifffile.imwrite)(path, img8.astype(np.uint16) * 257)  # same picture
    volume = read_image(path)
    assert volume.array.dtype == np.uint16
    as8 = segment(scale_model, img8, "Black", device="cpu")
    as16 = segment(scale_model, volume.array, "Black", device="cpu")
    np.testing.assert_array_equal(as16.labels, as8.labels)
    np.testing.assert_allclose(as16.probabilities.astype(np.float32), as8.probabilities.astype(np.float32), atol=2e-3)
    assert any("16-bit image: intensities divided by 65535" in n for n in as16.conversions)
    assert not any("bit image" in n for n in as8.conversions)  # 8-bit: nothing to say


# -- DICOM series -------------------------------------------------------------------------------------------------
def _by_position(folder):
    return {float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]): p
            for p in folder.glob("*.dcm")}


def test_dicom_series_with_a_missing_slice_is_refused(tmp_path):
    make_series(tmp_path / "s", n=6)
    _by_position(tmp_path / "s")[15.0].unlink()  # the third slice is lost
    with pytest.raises(ImageReadError, match=r"not evenly spaced: 5 mm between .* \(2 slices: missing slice"):
        read_image(tmp_path / "s")
    full = read_image(make_series(tmp_path / "ok", n=6) and tmp_path / "ok")
    assert full.spacing[0] == pytest.approx(2.5) and full.array.shape[0] == 6


@pytest.mark.parametrize("z", [16.0, 12.5], ids=["irregular", "duplicate-position"])
def test_dicom_series_with_uneven_positions_is_refused(tmp_path, z):
    make_series(tmp_path / "s", n=5)
    path = _by_position(tmp_path / "s")[15.0]
    ds = pydicom.dcmread(path)
    ds.ImagePositionPatient = [-158.0, -179.0, z]
    ds.save_as(path)
    with pytest.raises(ImageReadError, match="not evenly spaced" if z == 16.0 else "lie at the same position"):
        read_image(tmp_path / "s")


# -- NIfTI geometry -----------------------------------------------------------------------------------------------
def _nifti(path, zooms=(1.0, 1.0, 1.0)):
    """An .nii whose header states ``zooms`` as written by a broken tool (nibabel itself would fix them)."""
    nib.save(nib.Nifti1Image(np.zeros((12, 10, 8), np.float32), np.eye(4)), path)
    raw = bytearray(path.read_bytes())
    raw[80:92] = np.array(zooms, "<f4").tobytes()  # pixdim[1..3]
    raw[252:256] = np.array([0, 0], "<i2").tobytes()  # qform_code, sform_code: the zooms are the geometry
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("zooms, why", [((1, 0, 1), "not positive"), ((1, -2, 1), "not positive"),
                                        ((math.nan, 1, 1), "not a number"), ((1000, 1, 1), "above 100 mm")])
def test_nifti_with_broken_voxel_sizes_is_refused_naming_the_field(tmp_path, zooms, why):
    path = _nifti(tmp_path / "v.nii", zooms=zooms)
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert str(path) in str(err.value) and "pixdim[" in str(err.value) and why in str(err.value)


@pytest.mark.parametrize("kind", ["nan", "singular", "huge"])
def test_nifti_with_a_broken_affine_is_refused_naming_the_field(tmp_path, kind):
    affine = np.eye(4)
    if kind == "nan":
        affine[0, 3] = np.nan
    elif kind == "singular":
        affine[:3, 2] = affine[:3, 1]  # two voxel axes point the same way
    else:
        affine[0, 0] = 500.0
    path = tmp_path / "v.nii"
    img = nib.Nifti1Image(np.zeros((12, 10, 8), np.float32), affine)
    img.header["pixdim"][1:4] = 1.0  # sane voxel sizes: only the affine is broken
    img.header.set_qform(None, code=0)
    nib.save(img, path)
    with pytest.raises(ImageReadError, match=r"header field sform") as err:
        read_image(path)
    assert str(path) in str(err.value)


def test_nifti_dims_that_the_file_cannot_hold_are_refused_before_allocating(tmp_path):
    path = _nifti(tmp_path / "v.nii")
    raw = bytearray(path.read_bytes())
    raw[42:48] = np.array([2000, 2000, 2000], "<i2").tobytes()  # dim[1..3]: 8e9 voxels claimed, 3.8 KB stored
    path.write_bytes(bytes(raw))
    with pytest.raises(ImageReadError, match="above the limit|truncated"):
        read_image(path)


# -- attributes ---------------------------------------------------------------------------------------------------
def test_conflicting_attributes_on_the_command_line_are_refused(tmp_path, capsys):
    from napari_dmoe.model.routers import PatientAttribute

    spec = tiny("transunet2d-tiny").spec
    with pytest.raises(ValueError, match="conflicting values for attribute 'race': 'Black' and 'White'"):
        PatientAttribute.parse(["race=Black", "race=White"], spec)
    said_twice = PatientAttribute.parse(["race=Black", "race=Black"], spec)
    assert said_twice.mapping == {"race": "Black"} and said_twice.text == "race=Black"


# -- NaN models ---------------------------------------------------------------------------------------------------
def test_model_with_nan_weights_is_refused_on_load(tmp_path):
    m = tiny("transunet2d-tiny")
    path = save_model(tmp_path / "m.safetensors", m.network, m.spec)
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = next(k for k in tensors if k.endswith("weight") and "head" in k) if any(
        "head" in k for k in tensors) else next(iter(tensors))
    tensors[name][...] = float("nan")
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=f"NaN or infinite values .*{name}"):
        load_model(path)


@pytest.mark.parametrize("normalization", [{"kind": "window", "low": float("nan"), "high": 300},
                                           {"kind": "scale", "factor": float("inf")}])
def test_model_with_nan_normalization_is_refused_on_load(tmp_path, normalization):
    m = tiny("transunet2d-tiny")
    spec = dataclasses.replace(m.spec, normalization=normalization)
    path = save_model(tmp_path / "m.safetensors", build_network(spec), spec)
    with pytest.raises(CheckpointError, match="normalization.* expected a finite number"):
        load_model(path)
    assert "NaN" in json.loads(json.dumps(normalization)) or True
