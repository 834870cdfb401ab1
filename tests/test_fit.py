"""The "trained on" record (spec, dmoe train, demo models), the fit check and attributes from image headers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from napari_dmoe.inference.fit import FitError, check_fit, modality_family
from napari_dmoe.inference.patient import FROM_DICOM, FROM_SAMPLE, age_group, dicom_age_years, image_attributes
from napari_dmoe.io.checkpoint import read_spec, save_model
from napari_dmoe.model import build_network, make_spec
from napari_dmoe.model.spec import ModelSpec, SpecError

ASSETS = Path(__file__).resolve().parent.parent / "napari_dmoe" / "assets" / "models"
FUNDUS_RECORD = {"modality": "fundus photo (SLO)", "spatial_dims": 2, "channels": 1,
                 "intensity": {"mean": 122.9, "std": 21.8, "p1": 75.0, "p50": 122.0, "p99": 197.0,
                               "case_p50": [92.0, 140.0], "case_p99": [165.0, 214.2], "n_cases": 32},
                 "spacing": None}


def _spec(**changes):
    spec = make_spec("transunet2d-tiny", "age", ["0-19", "20-39", "40-59", "60-79", "80+"],
                     ["background", "lesion"])
    for k, v in changes.items():
        setattr(spec, k, v)
    return spec


def test_trained_on_round_trips_and_old_files_load(tmp_path):
    spec = _spec(trained_on=FUNDUS_RECORD)
    path = save_model(tmp_path / "m.safetensors", build_network(spec), spec)
    assert read_spec(path).trained_on == FUNDUS_RECORD
    old = spec.to_dict()
    del old["trained_on"]  # a file written before the field existed
    assert ModelSpec.from_dict(old).trained_on is None
    with pytest.raises(SpecError, match="unknown trained_on field"):
        ModelSpec.from_dict({**old, "trained_on": {"colour": "red"}})


def test_fit_of_matching_and_mismatching_images():
    spec = _spec(trained_on=FUNDUS_RECORD)
    rng = np.random.default_rng(0)
    fundus = rng.normal(120, 20, (128, 128)).clip(0, 255).astype(np.uint8)
    assert check_fit(spec, fundus, None) == []
    ct = rng.normal(-20, 200, (16, 64, 64)).astype(np.int16)
    kinds = {f.kind for f in check_fit(spec, ct, (3.0, 1.0, 1.0), modality="CT")}
    assert kinds == {"dims", "modality", "intensity"}
    colour = np.stack([fundus] * 3, axis=-1)
    found = check_fit(spec, colour, None, rgb=True)
    assert [f.kind for f in found] == ["channels"] and "colour (3 channels)" in found[0].message
    dark = (fundus // 8).astype(np.uint8)  # same kind of image, far darker than anything seen in training
    assert [f.kind for f in check_fit(spec, dark, None)] == ["intensity"]


def test_fit_without_record_checks_the_spec_only():
    spec = _spec()
    assert spec.trained_on is None
    assert check_fit(spec, np.zeros((40, 40), np.float32), None) == []
    assert [f.kind for f in check_fit(spec, np.zeros((4, 40, 40), np.float32), None)] == ["dims"]


def test_fit_flags_a_voxel_size_much_coarser_only():
    spec3d = make_spec("resunet3d-tiny", "stage", ["T1", "T2"], ["background", "CTV"])
    spec3d.trained_on = {"spatial_dims": 3, "channels": 1, "spacing": [3.0, 3.0, 3.0], "modality": "CT"}
    vol = np.zeros((32, 64, 64), np.int16)
    assert check_fit(spec3d, vol, (3.0, 2.0, 2.0), modality="CT") == []
    # finer than training: the engine resamples to 3 mm and loses nothing (issue 23: 1.2 mm clinical CT)
    assert check_fit(spec3d, vol, (3.0, 0.5, 0.5), modality="CT") == []
    found = check_fit(spec3d, vol, (3.0, 8.0, 8.0), modality="CT")
    assert [f.kind for f in found] == ["spacing"] and "8x8" in found[0].message and "coarser" in found[0].message


def test_modality_families():
    assert modality_family("fundus photo (SLO)") == modality_family("OP") == "fundus"
    assert modality_family("CT") == "CT" and modality_family("MR") == "MR"
    assert modality_family("unknown") is None and modality_family(None) is None


def test_dicom_age_and_sex_map_onto_the_vocabulary():
    assert dicom_age_years("045Y") == 45 and dicom_age_years("006M") == 0.5 and dicom_age_years("x") is None
    vocab = ["0-19", "20-39", "40-59", "60-79", "80+"]
    assert age_group(19.5, vocab) == "0-19" and age_group(45, vocab) == "40-59" and age_group(93, vocab) == "80+"
    spec = _spec()
    spec.attributes.append(type(spec.attributes[0])("sex", ["Female", "Male"]))
    found = image_attributes(spec, {"format": "dicom", "patient": {"age": "082Y", "sex": "F"}})
    assert found == {"age": ("80+", FROM_DICOM), "sex": ("Female", FROM_DICOM)}
    assert image_attributes(spec, {"patient": {"age": "", "sex": "O"}}) == {}  # unknown stays unknown
    sample = image_attributes(spec, {"dmoe_attributes": {"age": "20-39"}, "patient": {"age": "082Y"}})
    assert sample["age"] == ("20-39", FROM_SAMPLE)


def test_dicom_reader_keeps_patient_age_and_sex():
    from pydicom.data import get_testdata_file

    from napari_dmoe.io.dicom import read_dicom_file

    meta = read_dicom_file(get_testdata_file("MR_small.dcm")).meta
    assert meta["patient"] == {"age": "", "sex": "F"} and meta["modality"] == "MR"


def test_demo_models_carry_their_record():
    for lane, modality, dims, channels in (("fundus", "fundus photo (SLO)", 2, 1), ("prostate", "CT", 3, 1),
                                           ("skin", "dermoscopy", 2, 3)):
        rec = read_spec(ASSETS / f"{lane}-dmoe.safetensors").trained_on
        assert rec["modality"] == modality and rec["spatial_dims"] == dims and rec["channels"] == channels
        stats = rec["intensity"]
        assert stats["p1"] <= stats["p50"] <= stats["p99"] and stats["n_cases"] >= 16
        assert rec["features"]["threshold"] > 0 and rec["features"]["layers"]  # tests/test_ood.py checks the rest
    assert read_spec(ASSETS / "prostate-dmoe.safetensors").trained_on["spacing"] == [3.0, 3.0, 3.0]


def test_demo_samples_fit_their_model_and_not_the_others():
    from napari_dmoe.plugin import samples

    fundus = read_spec(ASSETS / "fundus-dmoe.safetensors")
    skin = read_spec(ASSETS / "skin-dmoe.safetensors")
    prostate = read_spec(ASSETS / "prostate-dmoe.safetensors")
    f_img, f_kw, _ = samples.fundus_sample()[0]
    p_img, p_kw, _ = samples.prostate_sample()[0]
    s_img, _, _ = samples.skin_sample()[0]
    p_mod = p_kw["metadata"]["dmoe_modality"]
    assert check_fit(fundus, f_img, None, modality=f_kw["metadata"]["dmoe_modality"]) == []
    assert check_fit(prostate, p_img, p_kw["scale"], modality=p_mod) == []
    assert check_fit(skin, s_img, None, rgb=True, modality="dermoscopy") == []
    assert {"dims", "modality", "intensity"} <= {f.kind for f in check_fit(fundus, p_img, p_kw["scale"],
                                                                            modality=p_mod)}
    retina, r_kw, _ = samples.retina_photo()[0]
    assert check_fit(skin, retina, None, rgb=True, modality=r_kw["metadata"]["dmoe_modality"])


def test_the_request_names_the_file_and_what_differs(tmp_path):
    import nibabel as nib

    from napari_dmoe.io.images import read_image

    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.full((40, 40, 8), 500, np.int16), np.eye(4)), path)
    from inference_models import tiny
    from napari_dmoe.inference.request import SegmentRequest, run

    model = tiny("transunet2d-tiny")
    model.spec.trained_on = FUNDUS_RECORD
    volume = read_image(path)
    request = SegmentRequest(volume.array, None, volume.known_spacing, rgb=volume.rgb, source=str(path))
    with pytest.raises(FitError, match=r"ct\.nii\.gz: does not fit the model .*3D volume.*--force"):
        run(model, request)


@pytest.mark.slow
def test_dmoe_train_records_what_it_trained_on(tmp_path):
    from training_data import tiny_config, write_fairseg

    root = write_fairseg(tmp_path / "data", n_train=8, n_test=2)
    cfg = tiny_config(tmp_path / "c.yaml", tmp_path / "run", {"format": "fairseg", "root": str(root),
                                                              "attributes": "race", "crop": None},
                      recipe={"steps": 1, "val_every": 1})
    subprocess.run([sys.executable, "-m", "napari_dmoe.cli.main", "train", str(cfg), "--quiet"], check=True,
                   capture_output=True)
    rec = read_spec(tmp_path / "run" / "best.safetensors").trained_on
    assert rec["modality"] == "fundus photo (SLO)" and rec["spatial_dims"] == 2 and rec["channels"] == 1
    assert rec["intensity"]["n_cases"] == rec["intensity"]["of_cases"] >= 6
    assert rec["intensity"]["case_p50"][0] <= rec["intensity"]["p50"] <= rec["intensity"]["case_p50"][1] + 1e-6
    # the network's own features on its training images, and the threshold from the held-out ones
    from napari_dmoe.inference.ood import parse_record

    features = rec["features"]
    assert features["n_train"] == rec["intensity"]["of_cases"] and features["n_validation"] >= 1
    assert parse_record(features).threshold > 0


def test_demo_model_weights_match_the_sample_script(tmp_path):
    """The rewrite of the demo headers keeps every tensor bitwise (the script refuses otherwise)."""
    sys.path.insert(0, str(ASSETS.parent.parent.parent / "sample_data"))
    from record_trained_on import rewrite

    src = ASSETS / "skin-dmoe.safetensors"
    copy = tmp_path / src.name
    copy.write_bytes(src.read_bytes())
    rewrite(copy, {"modality": "dermoscopy", "spatial_dims": 2, "channels": 3, "intensity": None, "spacing": None})
    before, after = load_file(str(src)), load_file(str(copy))
    assert all(torch.equal(before[k], after[k]) for k in before) and before.keys() == after.keys()
    with safe_open(str(copy), framework="pt") as f:
        assert json.loads(f.metadata()["dmoe_spec"])["trained_on"]["intensity"] is None


@pytest.mark.slow
def test_dmoe_segment_refuses_a_misfit_unless_forced(tmp_path):
    import nibabel as nib

    ct = tmp_path / "ct.nii.gz"
    # a small CT-like volume, without negative values: a signed image with negative ones has no full scale for this
    # 8-bit model and is refused even with --force (test_trust_verbs_silent)
    vol = np.abs(np.random.default_rng(0).normal(-50, 300, (48, 48, 4))).astype(np.int16)
    nib.save(nib.Nifti1Image(vol, np.diag([1.0, 1.0, 3.0, 1.0])), ct)
    model = ASSETS / "fundus-dmoe.safetensors"
    cmd = [sys.executable, "-m", "napari_dmoe.cli.main", "segment", str(model), str(ct), "-a", "Black", "-q"]
    refused = subprocess.run([*cmd, "-o", str(tmp_path / "a.nii.gz")], capture_output=True, text=True, check=False)
    assert refused.returncode != 0 and not (tmp_path / "a.nii.gz").exists()
    assert "ct.nii.gz: does not fit the model" in refused.stderr and "3D volume" in refused.stderr
    assert "--force" in refused.stderr
    forced = subprocess.run([*cmd, "-o", str(tmp_path / "b.nii.gz"), "--force"], capture_output=True, text=True,
                            check=False)
    assert forced.returncode == 0, forced.stderr
    assert nib.load(tmp_path / "b.nii.gz").shape == vol.shape


def test_recipe_choice_is_recorded_in_a_model_header(tmp_path, capsys):
    """Item 5 of issue 26: why a shipped model's recipe was chosen goes into its provenance, weights untouched,
    and ``dmoe info`` says it."""
    sys.path.insert(0, str(ASSETS.parent.parent.parent / "sample_data"))
    import record_recipe_choice

    from napari_dmoe.cli.main import main

    src = ASSETS / "skin-dmoe.safetensors"
    copy = tmp_path / src.name
    copy.write_bytes(src.read_bytes())
    choice = tmp_path / "dmoe.json"
    choice.write_text(json.dumps({"method": "dmoe", "rule": "higher mean worst group on val-a and val-v",
                                  "chosen": "new", "ranking": ["new", "old"],
                                  "candidates": {"new": {"mean": 0.81, "min": 0.78},
                                                 "old": {"mean": 0.77, "min": 0.7}}}))
    assert record_recipe_choice.main([str(copy), str(choice), "--tests", "steadier, not better on average"]) == 0
    before, after = load_file(str(src)), load_file(str(copy))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    capsys.readouterr()
    assert main(["info", str(copy)]) == 0
    out = capsys.readouterr().out
    assert "recipe chosen on val-a, val-v (validation only): new 0.81 over old 0.77" in out
    assert "tests beside it: steadier, not better on average" in out


def test_shipped_fundus_model_says_why_its_recipe_was_chosen():
    prov = read_spec(ASSETS / "fundus-dmoe.safetensors").provenance
    choice = prov["recipe_choice"]
    assert choice["chosen"] == "robust+mix0.5" and prov["config"]["model"]["router_mix"] == 0.5
    assert "old" in [r["candidate"] for r in choice["ranking"]]  # the previous recipe was one of the candidates
    assert (ASSETS.parent.parent.parent / choice["file"]).is_file()
