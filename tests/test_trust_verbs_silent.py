"""Issue 28, silently wrong in every verb: NIfTI pixdim against the sform (decided as nibabel and ITK do, refused
when the qform disagrees), every recipe number with a range, bit depths judged and converted as the model sees them
(16-bit, 12-bit in 16, int16, float [0, 1]) with notes that say only what happened, and notes for images that the
plan would shrink to nothing or squash."""
from __future__ import annotations

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest
import tifffile
import yaml

from napari_dmoe.cli.main import main
from napari_dmoe.inference.engine import segment
from napari_dmoe.inference.fit import check_fit, intensity_stats
from napari_dmoe.io.images import ImageReadError, read_image

from inference_models import make_image, tiny


# -- 4. pixdim against the sform --------------------------------------------------------------------------------
def _nifti(path, sform_mm=2.0, pixdim_mm=1.0, qform=False):
    img = nib.Nifti1Image(np.arange(8 * 8 * 6, dtype=np.float32).reshape(8, 8, 6), np.diag([sform_mm] * 3 + [1.0]))
    if qform:  # a qform built from pixdim, as scanners' converters write it
        img.set_qform(np.diag([pixdim_mm] * 3 + [1.0]), code=1)
    img.header.set_zooms((pixdim_mm,) * 3)
    nib.save(img, path)
    return path


def test_pixdim_overridden_by_the_sform_is_a_warning_and_the_sform_sets_the_spacing(tmp_path):
    volume = read_image(_nifti(tmp_path / "a.nii.gz"))
    assert volume.spacing == (2.0, 2.0, 2.0)  # the geometry nibabel and ITK use: the sform's
    assert any("pixdim says voxel size 1x1x1 mm but the sform (code 2) says 2x2x2 mm" in w
               for w in volume.meta["warnings"])
    assert read_image(_nifti(tmp_path / "b.nii.gz", pixdim_mm=2.0)).meta["warnings"] == []


def test_qform_and_sform_that_disagree_on_the_voxel_size_are_refused(tmp_path):
    path = _nifti(tmp_path / "c.nii.gz", qform=True)
    before = path.read_bytes()
    with pytest.raises(ImageReadError, match=r"c.nii.gz: header fields sform \(code 2: voxel size 2x2x2 mm\) and "
                                             r"qform \(code 1: 1x1x1 mm"):
        read_image(path)
    assert path.read_bytes() == before
    same = read_image(_nifti(tmp_path / "d.nii.gz", sform_mm=1.5, pixdim_mm=1.5, qform=True))
    assert same.spacing == (1.5, 1.5, 1.5) and same.meta["warnings"] == []


def test_segment_refuses_a_contradictory_nifti_in_one_line(tmp_path, capsys):
    from inference_models import make_model

    model = make_model(tmp_path / "m.safetensors")
    path = _nifti(tmp_path / "c.nii.gz", qform=True)
    assert main(["segment", str(model), str(path), "-a", "Black", "-o", str(tmp_path / "o.nii.gz"), "--force",
                 "-q", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "sform" in err and "qform" in err and "Traceback" not in err
    assert not (tmp_path / "o.nii.gz").exists()


# -- 5. every recipe number has a range ---------------------------------------------------------------------------
def test_every_number_in_the_schema_has_a_range():
    from napari_dmoe.training.config import SCHEMA
    from napari_dmoe.training.ranges import RANGES

    def numbers(schema, prefix=""):
        for key, spec in schema.items():
            if isinstance(spec, dict):
                yield from numbers(spec, f"{prefix}{key}.")
            elif spec.kind in ("int", "number"):
                yield f"{prefix}{key}"

    assert sorted(numbers(SCHEMA)) == sorted(RANGES)


def _config(tmp_path, key, value):
    from training_data import tiny_config, write_folder

    root = write_folder(tmp_path / "data", n=6)
    section, _, name = key.rpartition(".")
    extra = {section: {name: value}} if section else {}
    path = tiny_config(tmp_path / "c.yaml", tmp_path / "out", {"format": "folder", "root": str(root),
                       "csv": "dataset.csv", "attributes": {"sex": ["F", "M"]}}, **extra)
    if not section:
        raw = yaml.safe_load(path.read_text())
        raw[name] = value
        path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("key, value", [("recipe.grad_clip", -1), ("recipe.grad_clip", 0), ("recipe.poly_power", -1),
                                        ("recipe.momentum", 1.5), ("recipe.lr", float("inf")), ("seed", -3),
                                        ("augment.prob", 2), ("recipe.sw_overlap", 1), ("model.top_k", 0),
                                        ("recipe.weight_decay", float("nan")), ("recipe.warmup_steps", -1)])
def test_recipe_numbers_outside_their_range_are_refused_naming_the_key(tmp_path, capsys, key, value):
    from napari_dmoe.training.config import ConfigError, load_config

    path = _config(tmp_path, key, value)
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        load_config(path)
    assert main(["train", str(path), "--device", "cpu"]) == 2  # the CLI: one line, before any training
    err = capsys.readouterr().err
    assert f"config key '{key}'" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# -- 6, 7. bit depths as the model sees them ------------------------------------------------------------------------
IMG8 = ((make_image((64, 64)) + 2) / 4 * 255).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def model8(tmp_path_factory):
    """A model trained on 8-bit images (divide by 255), with the record of its training intensities."""
    from napari_dmoe.io.checkpoint import save_model

    record = {"spatial_dims": 2, "channels": 1, "intensity": intensity_stats([IMG8, IMG8[::-1]])}
    m = tiny("transunet2d-tiny", normalization={"kind": "scale", "factor": 255}, trained_on=record)
    m.path = str(save_model(tmp_path_factory.mktemp("m") / "m8.safetensors", m.network, m.spec))
    return m


def _variants(tmp_path):
    """The same picture as 16-bit, 12-bit-in-16, int16 and float [0, 1] files."""
    twelve = np.round(IMG8.astype(np.float64) * 4095 / 255).astype(np.uint16)
    files = {"16-bit.png": IMG8.astype(np.uint16) * 257, "12-bit.png": twelve, "12-bit.tif": twelve,
             "int16.tif": twelve.astype(np.int16), "float.tif": (IMG8 / 255).astype(np.float32)}
    for name, array in files.items():
        (iio.imwrite if name.endswith(".png") else tifffile.imwrite)(tmp_path / name, array)
    return files


TWELVE = "16-bit image whose values reach only 4079 (12-bit data): intensities divided by 4095"


@pytest.mark.parametrize("name, note", [
    ("16-bit.png", "16-bit image: intensities divided by 65535"), ("12-bit.png", TWELVE), ("12-bit.tif", TWELVE),
    ("int16.tif", "signed " + TWELVE),
    ("float.tif", "values in [0, 1] (its full scale is 1): intensities divided by 1")])
def test_other_bit_depths_fit_and_give_the_8_bit_mask(model8, tmp_path, name, note):
    _variants(tmp_path)
    volume = read_image(tmp_path / name)
    assert check_fit(model8.spec, volume.array) == []  # judged after the conversion, not refused before it
    reference = segment(model8, IMG8, "Black", device="cpu")
    result = segment(model8, volume.array, "Black", device="cpu")
    assert (result.labels == reference.labels).mean() > 0.995
    np.testing.assert_allclose(result.probabilities.astype(np.float32),
                               reference.probabilities.astype(np.float32), atol=5e-3)
    assert [n for n in result.conversions if "divided by" in n] == [n for n in result.conversions if note in n] != []


def test_16_bit_png_is_segmented_without_force(model8, tmp_path, capsys):
    _variants(tmp_path)
    assert main(["segment", model8.path, str(tmp_path / "16-bit.png"), "-a", "Black", "-o", str(tmp_path / "o.png"),
                 "-q", "--device", "cpu"]) == 0, capsys.readouterr().err


def test_negative_int16_is_refused_even_with_force(model8, tmp_path, capsys):
    array = (IMG8.astype(np.int16) * 8) - 1000  # CT-like: negative values, no full scale
    tifffile.imwrite(tmp_path / "ct.tif", array)
    findings = check_fit(model8.spec, array)
    assert any(f.kind == "intensity" and "negative values (down to -1000)" in f.message for f in findings)
    before = (tmp_path / "ct.tif").read_bytes()
    assert main(["segment", model8.path, str(tmp_path / "ct.tif"), "-a", "Black", "-o", str(tmp_path / "o.png"),
                 "--force", "-q", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "negative values" in err and "convert the image to unsigned" in err and "Traceback" not in err
    assert not (tmp_path / "o.png").exists() and (tmp_path / "ct.tif").read_bytes() == before


def test_a_16_bit_image_that_is_dark_is_still_judged(model8):
    """Values that use all 16 bits but sit near 0 are dark as the model sees them: still an intensity finding."""
    dark = (IMG8.astype(np.uint16) * 16)
    dark[0, 0] = 65535  # full range used: divided by 65535, the picture is nearly black
    assert [f.kind for f in check_fit(model8.spec, dark)] == ["intensity"]


# -- 8. notes where one is due --------------------------------------------------------------------------------------
def test_voxels_that_resample_to_nothing_are_a_finding(tmp_path, capsys):
    from napari_dmoe.io.checkpoint import save_model
    from napari_dmoe.io.images import write_volume

    model = tiny("resunet3d-tiny", spacing=[1.0, 1.0, 1.0])
    volume = np.random.default_rng(0).normal(0, 1, (32, 40, 36)).astype(np.float32)
    findings = check_fit(model.spec, volume, spacing=(0.001, 0.001, 0.001))
    assert [f.kind for f in findings] == ["spacing"]
    assert "32x40x36 voxels of 0.001x0.001x0.001 mm become 1x1x1: too few to segment" in findings[0].message
    assert check_fit(model.spec, volume, spacing=(1.0, 1.0, 1.0)) == []
    path = save_model(tmp_path / "m3d.safetensors", model.network, model.spec)
    src = write_volume(tmp_path / "tiny.nii.gz", volume, (0.001, 0.001, 0.001))
    assert main(["segment", str(path), str(src), "-a", "Black", "-o", str(tmp_path / "o.nii.gz"), "--force", "-q",
                 "--device", "cpu"]) == 0
    assert "too few to segment" in capsys.readouterr().err  # the note under --force


def test_a_squashed_image_is_a_finding_and_a_note_under_force(model8, tmp_path, capsys):
    long = np.tile(IMG8, (2, 79))[:128, :5000]
    assert [f.kind for f in check_fit(model8.spec, long)] == ["shape"]
    assert "squashing it 39.1x" in check_fit(model8.spec, long)[0].message
    assert check_fit(model8.spec, np.tile(IMG8, (2, 3))) == []  # 128x192: resized, barely distorted
    iio.imwrite(tmp_path / "long.png", long)
    out = tmp_path / "o.png"
    assert main(["segment", model8.path, str(tmp_path / "long.png"), "-a", "Black", "-o", str(out), "-q",
                 "--device", "cpu"]) == 2
    assert "squashing" in capsys.readouterr().err
    assert main(["segment", model8.path, str(tmp_path / "long.png"), "-a", "Black", "-o", str(out), "--force",
                 "-q", "--device", "cpu"]) == 0
    assert "squashing it 39.1x" in capsys.readouterr().err and out.is_file()
