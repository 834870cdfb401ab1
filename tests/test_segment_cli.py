"""`dmoe segment` end to end: real files in, labels out in the source geometry, as a real subprocess."""
from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from napari_dmoe.io.checkpoint import save_model
from napari_dmoe.cli.main import main
from napari_dmoe.model import build_network, make_spec

pytestmark = pytest.mark.slow  # subprocesses or real training: over ~5 s each


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    torch_seed = __import__("torch").manual_seed
    torch_seed(0)
    spec3 = make_spec("resunet3d-tiny", "stage", ["T1", "T2", "T3", "T4"], ["background", "CTV"],
                      input_size=[64, 64, 64])
    spec2 = make_spec("transunet2d-tiny", "race", ["Asian", "Black", "White"], ["background", "rim", "cup"])
    save_model(folder / "m3.safetensors", build_network(spec3), spec3)
    save_model(folder / "m2.safetensors", build_network(spec2), spec2)
    return folder / "m2.safetensors", folder / "m3.safetensors"


def dmoe(*args):
    return subprocess.run([sys.executable, "-m", "napari_dmoe.cli.main", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_nifti_labels_keep_the_source_affine_and_routing_maps(models, tmp_path):
    affine = np.array([[0, 0, -3.0, 10], [-1.2, 0, 0, 5], [0, 1.5, 0, -7], [0, 0, 0, 1]])  # permuted, flipped
    src = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((40, 30, 12)).astype("float32"), affine), src)
    out = tmp_path / "labels.nii.gz"
    result = dmoe("segment", models[1], src, "-a", "T3", "-o", out, "--routing-out", tmp_path / "routing")
    assert result.returncode == 0, result.stderr
    written = nib.load(out)
    assert written.shape == (40, 30, 12)
    np.testing.assert_array_equal(written.affine, nib.load(src).affine)  # as stored (float32 header)
    assert set(np.unique(np.asanyarray(written.dataobj))) <= {0, 1}
    experts = [nib.load(tmp_path / "routing" / f"vol_expert{e}.nii.gz") for e in range(8)]
    total = sum(np.asanyarray(e.dataobj).astype(int) for e in experts)
    assert np.abs(total - 255).max() <= 8  # gate weights sum to 1 per voxel (8 roundings of 1/255)
    dominant = np.asanyarray(nib.load(tmp_path / "routing" / "vol_dominant_expert.nii.gz").dataobj)
    assert dominant.shape == (40, 30, 12) and dominant.max() < 8
    assert "stage=T3" in result.stdout


def test_png_and_bad_attribute(models, tmp_path):
    src = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(1).random((70, 90)) * 255).astype("uint8")).save(src)
    out = tmp_path / "mask.png"
    assert main(["segment", str(models[0]), str(src), "-a", "race=Black", "-o", str(out), "-q"]) == 0
    mask = np.asarray(Image.open(out))
    assert mask.shape == (70, 90) and mask.max() <= 2
    bad = dmoe("segment", models[0], src, "-a", "Martian", "-o", tmp_path / "x.png")
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert "'Martian' is not in this model's vocabulary" in bad.stderr


def test_batch_over_a_folder_with_csv(models, tmp_path):
    rng = np.random.default_rng(2)
    (tmp_path / "in").mkdir()
    for name in ["a.png", "b.png"]:
        Image.fromarray((rng.random((40, 50)) * 255).astype("uint8")).save(tmp_path / "in" / name)
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    csv = tmp_path / "cases.csv"
    csv.write_text("image,race\na.png,White\nb.png,\nbroken.png,Asian\n")
    result = dmoe("segment", models[0], tmp_path / "in", "--csv", csv, "-o", tmp_path / "out", "-q")
    assert result.returncode == 1  # one case failed, the others were written
    assert (tmp_path / "out" / "a_labels.png").is_file() and (tmp_path / "out" / "b_labels.png").is_file()
    assert "broken.png" in result.stderr and "2 of 3 images segmented" in result.stdout
    assert "unknown" in result.stdout  # b.png had no attribute: averaged over routers, and said so
    csv.write_text("image,race\na.png,Martian\n")
    bad = dmoe("segment", models[0], tmp_path / "in", "--csv", csv, "-o", tmp_path / "out2")
    assert bad.returncode == 2 and "vocabulary" in bad.stderr


def test_batch_csv_with_a_partly_unknown_patient_runs_the_routers_that_fit(tmp_path):
    """Two attributes (race x sex, 6 intersectional routers): an empty sex cell averages over the 2 routers of the
    known race, not over all 6; a value outside the vocabulary is refused with the line and the vocabulary."""
    import dataclasses

    from napari_dmoe.io.cases import read_batch_csv
    from napari_dmoe.model.spec import Attribute

    spec = make_spec("transunet2d-tiny", "race", ["Asian", "Black", "White"], ["background", "rim", "cup"])
    spec = dataclasses.replace(spec, attributes=[spec.attributes[0], Attribute("sex", ["Female", "Male"])])
    __import__("torch").manual_seed(0)
    model_path = save_model(tmp_path / "two.safetensors", build_network(spec).eval(), spec)
    (tmp_path / "in").mkdir()
    for name in ["a.png", "b.png", "c.png"]:
        Image.fromarray((np.random.default_rng(3).random((40, 50)) * 255).astype("uint8")).save(tmp_path / "in" / name)
    csv = tmp_path / "cases.csv"
    csv.write_text("image,race,sex\na.png,Black,Male\nb.png,Black,\nc.png,,unknown\n")
    rows = read_batch_csv(csv, spec)
    assert rows == [("a.png", {"race": "Black", "sex": "Male"}), ("b.png", {"race": "Black", "sex": "unknown"}),
                    ("c.png", None)]
    result = dmoe("segment", model_path, tmp_path / "in", "--csv", csv, "-o", tmp_path / "out", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    b_line = next(line for line in result.stdout.splitlines() if "b.png" in line)
    assert "race=Black" in b_line and "sex=unknown (averaged over 2 values)" in b_line, b_line
    csv.write_text("image,race,sex\na.png,Black,Other\n")
    bad = dmoe("segment", model_path, tmp_path / "in", "--csv", csv, "-o", tmp_path / "out2")
    assert bad.returncode == 2 and "line 2" in bad.stderr and "sex='Other'" in bad.stderr, bad.stderr
