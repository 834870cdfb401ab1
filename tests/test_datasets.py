"""Training datasets on tiny files written in each public format."""
from __future__ import annotations

import csv
from pathlib import Path

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from napari_dmoe.datasets.base import AGE_BINS, DatasetError, Vocabulary, age_bin, check_dataset
from napari_dmoe.datasets.formats import FairSegDataset, GenericFolderDataset, HAM10000Dataset, NiftiFolderDataset
from napari_dmoe.model.spec import Attribute, ModelSpec

RACE = Attribute("race", ["Asian", "Black", "White"])
GENDER = Attribute("gender", ["Female", "Male"])


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


# -- vocabulary -------------------------------------------------------------------------------------------
def test_vocabulary_matches_model_spec_numbering():
    spec = ModelSpec(arch="transunet2d", class_names=["bg", "rim", "cup"], attributes=[RACE, GENDER])
    vocab = Vocabulary([RACE, GENDER])
    for values in [("Asian", "Female"), ("Black", "Male"), ("White", "Male")]:
        assert vocab.router_index(values) == spec.router_index(list(values))
    assert vocab.groups()[3] == "Black/Male"
    assert [age_bin(a) for a in (0, 19.9, 20, 45, 79, 80, 103)] == ["0-19", "0-19", "20-39", "40-59", "60-79",
                                                                    "80+", "80+"]


# -- FairSeg ----------------------------------------------------------------------------------------------
def write_fairseg(root: Path, name: str, race: int, gender: int = 0, age_days: float = 60 * 365.25,
                  language: int = 0, shape=(40, 40), mask=None) -> Path:
    if mask is None:
        mask = np.zeros(shape, np.int8)
        mask[10:30, 10:20] = -1  # rim
        mask[10:30, 20:30] = -2  # cup
    np.savez(root / f"{name}.npz", slo_fundus=np.full(shape, (race * 50 + 10) % 256, np.uint8), disc_cup_mask=mask,
             race=np.array(race), gender=np.array(gender), age=np.array(age_days), ethnicity=np.array(0),
             language=np.array(language), maritalstatus=np.array(0))
    return root / f"{name}.npz"


def test_fairseg_items_class_mapping_and_names_file(tmp_path):
    for i, race in enumerate([0, 1, 2]):
        write_fairseg(tmp_path, f"data_{i:04d}", race)
    (tmp_path / "train.txt").write_text("data_0000\ndata_0002.npz\n")
    ds = FairSegDataset(tmp_path, [RACE], names="train.txt", size=None, crop=None)
    assert len(ds) == 2
    item = ds[1]
    assert item["id"] == "data_0002" and item["group"] == "White" and item["attr"] == 2
    assert item["image"].dtype == np.float32 and item["image"].shape == (1, 40, 40)
    assert item["label"].dtype == np.int64
    assert (item["label"][10:30, 10:20] == 1).all() and (item["label"][10:30, 20:30] == 2).all()
    assert item["label"].sum() == 200 * 1 + 200 * 2
    assert float(item["image"].max()) == 110.0  # raw intensities: normalisation is the engine's job


def test_fairseg_centre_crop_then_resize(tmp_path):
    mask = np.zeros((600, 560), np.int8)
    mask[44:556, 24:536] = -2  # exactly the central 512 x 512 window
    path = write_fairseg(tmp_path, "big", 1, shape=(600, 560), mask=mask)
    ds = FairSegDataset(tmp_path, [RACE], size=None)
    assert ds[0]["image"].shape == (1, 512, 512) and (ds[0]["label"] == 2).all()
    ds = FairSegDataset(tmp_path, [RACE], size=(32, 32))
    item = ds[0]
    assert item["image"].shape == (1, 32, 32) and item["label"].shape == (32, 32)
    assert set(np.unique(item["label"])) == {2}
    assert path.exists()


def test_fairseg_intersectional_age_and_missing(tmp_path):
    write_fairseg(tmp_path, "a", race=1, gender=1)
    write_fairseg(tmp_path, "b", race=0, gender=0, language=-1)  # language missing
    write_fairseg(tmp_path, "c", race=2, gender=0, age_days=25 * 365.25)
    spec = ModelSpec(arch="transunet2d", class_names=["bg", "rim", "cup"], attributes=[RACE, GENDER])
    ds = FairSegDataset(tmp_path, spec, size=None, crop=None)
    item = ds[0]
    assert item["group"] == "Black/Male" and item["attr"] == spec.router_index(["Black", "Male"]) == 3
    ages = FairSegDataset(tmp_path, [Attribute("age", list(AGE_BINS))], size=None, crop=None)
    assert [ages[i]["group"] for i in range(3)] == ["60-79", "60-79", "20-39"]
    lang = FairSegDataset(tmp_path, [Attribute("language", ["English", "Spanish", "Others"])], size=None)
    assert len(lang) == 2 and lang.skipped["missing language"] == 1
    with pytest.raises(DatasetError, match="no value for attribute 'language'"):
        FairSegDataset(tmp_path, [Attribute("language", ["English"])], on_missing="error")


def test_fairseg_errors(tmp_path):
    write_fairseg(tmp_path, "a", race=7)
    with pytest.raises(DatasetError, match=r"race='7' is not in the vocabulary"):
        FairSegDataset(tmp_path, [RACE])
    with pytest.raises(DatasetError, match="no attribute 'income'"):
        FairSegDataset(tmp_path, [Attribute("income", ["low"])])
    with pytest.raises(DatasetError, match="missing.npz: listed sample not found"):
        FairSegDataset(tmp_path, [RACE], names=["missing"])
    bad = tmp_path / "pickled"
    bad.mkdir()
    np.savez(bad / "p.npz", slo_fundus=np.zeros((4, 4)), race=np.array([{"x": 1}], dtype=object))
    with pytest.raises(DatasetError, match="p.npz"):  # object arrays would need unpickling: refused
        FairSegDataset(bad, [RACE])


def test_fairseg_check_reports_bad_mask_and_absent_group(tmp_path):
    write_fairseg(tmp_path, "ok", race=0)
    mask = np.zeros((40, 40), np.int8)
    mask[0, 0] = 5
    write_fairseg(tmp_path, "weird", race=1, mask=mask)
    ds = FairSegDataset(tmp_path, [RACE], size=None, crop=None)
    with pytest.raises(DatasetError, match=r"weird.npz: mask has unexpected values \[5\]"):
        check_dataset(ds)
    report = check_dataset(ds, raise_on_error=False)
    assert report.counts == {"Asian": 1, "Black": 1, "White": 0}
    assert any("'White'" in w for w in report.warnings) and len(report.errors) == 1
    with pytest.raises(DatasetError, match="weird.npz"):
        ds[1]


def test_items_collate_in_a_dataloader(tmp_path):
    for i in range(2):
        write_fairseg(tmp_path, f"s{i}", race=i)
    batch = next(iter(DataLoader(FairSegDataset(tmp_path, [RACE], size=(16, 16)), batch_size=2)))
    assert batch["image"].shape == (2, 1, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64 and batch["attr"].tolist() == [0, 1]


# -- HAM10000 ---------------------------------------------------------------------------------------------
def make_ham(root: Path, n_lesions: int = 10) -> list[list]:
    rows = []
    ages = [5, 25, 45, 65, 85]
    (root / "HAM10000_images_part_1").mkdir()
    (root / "masks").mkdir()
    for lesion in range(n_lesions):
        for image in range(1 + lesion % 2):  # some lesions have two images
            image_id = f"ISIC_{lesion:03d}{image}"
            age = "" if lesion == 3 and image == 0 else ages[lesion % 5]
            rows.append([f"HAM_{lesion:04d}", image_id, "nv", "histo", age, "male", "back"])
            iio.imwrite(root / "HAM10000_images_part_1" / f"{image_id}.jpg", np.full((20, 24, 3), 120, np.uint8))
            mask = np.zeros((20, 24), np.uint8)
            mask[5:15, 6:18] = 255
            iio.imwrite(root / "masks" / f"{image_id}_segmentation.png", mask)
    write_csv(root / "HAM10000_metadata.csv", ["lesion_id", "image_id", "dx", "dx_type", "age", "sex",
                                               "localization"], rows)
    return rows


def test_ham_age_bins_drop_and_items(tmp_path):
    rows = make_ham(tmp_path)
    vocab = [Attribute("age", list(AGE_BINS))]
    ds = HAM10000Dataset(tmp_path, vocab, split="all", size=(16, 16))
    assert ds.n_dropped_no_age == 1 and len(ds) == len(rows) - 1
    counts = check_dataset(ds).counts
    assert counts == {"0-19": 3, "20-39": 3, "40-59": 3, "60-79": 2, "80+": 3}  # lesion 3 (age 65) lost one image
    item = ds[0]
    assert item["image"].shape == (3, 16, 16) and item["label"].shape == (16, 16)
    assert set(np.unique(item["label"])) == {0, 1} and item["group"] == "0-19" and item["attr"] == 0
    full = HAM10000Dataset(tmp_path, vocab, size=None)[0]["label"]
    assert full.sum() == 10 * 12  # 255 -> class 1, exactly


def test_ham_split_by_lesion_is_disjoint_and_deterministic(tmp_path):
    make_ham(tmp_path)
    vocab = [Attribute("age", list(AGE_BINS))]
    splits = {s: HAM10000Dataset(tmp_path, vocab, split=s, size=None) for s in ("train", "val", "test")}
    lesions = {s: {ds.lesion_of[r.id] for r in ds.records} for s, ds in splits.items()}
    assert not (lesions["train"] & lesions["val"]) and not (lesions["train"] & lesions["test"])
    assert not (lesions["val"] & lesions["test"])
    assert sum(len(ds) for ds in splits.values()) == len(HAM10000Dataset(tmp_path, vocab, size=None))
    again = HAM10000Dataset(tmp_path, vocab, split="test", size=None)
    assert [r.id for r in again.records] == [r.id for r in splits["test"].records]
    assert len(lesions["train"]) == 8 and len(lesions["val"]) == 1 and len(lesions["test"]) == 1


def test_ham_errors(tmp_path):
    make_ham(tmp_path, n_lesions=3)
    mask = np.zeros((20, 24), np.uint8)
    mask[0, 0] = 128
    iio.imwrite(tmp_path / "masks" / "ISIC_0000_segmentation.png", mask)
    ds = HAM10000Dataset(tmp_path, [Attribute("sex", ["female", "male"])], size=None)
    with pytest.raises(DatasetError, match=r"ISIC_0000_segmentation.png: mask has unexpected values \[128\]"):
        check_dataset(ds)
    (tmp_path / "HAM10000_images_part_1" / "ISIC_0010.jpg").unlink()
    with pytest.raises(DatasetError, match="ISIC_0010.jpg"):
        HAM10000Dataset(tmp_path, [Attribute("sex", ["female", "male"])])
    with pytest.raises(DatasetError, match="split='dev'"):
        HAM10000Dataset(tmp_path, [Attribute("sex", ["male"])], split="dev")


# -- NIfTI folder -----------------------------------------------------------------------------------------
def make_nifti_folder(root: Path, cases: dict[str, str], shape=(6, 5, 4)) -> None:
    (root / "images").mkdir()
    (root / "labels").mkdir()
    affine = np.diag([-1.5, -1.5, 3.0, 1.0])
    for i, case in enumerate(cases):
        image = np.random.default_rng(i).normal(size=shape).astype(np.float32)
        label = np.zeros(shape, np.uint8)
        label[1:3, 1:3, 1:3] = 1
        nib.save(nib.Nifti1Image(image, affine), root / "images" / f"{case}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labels" / f"{case}.nii.gz")
    write_csv(root / "attributes.csv", ["case_id", "T_stage"], [[c, s] for c, s in cases.items() if s is not None])


def test_nifti_folder_items_and_report(tmp_path):
    make_nifti_folder(tmp_path, {"p1": "T1", "p2": "T3", "p3": "T3"})
    stage = Attribute("stage", ["T1", "T2", "T3", "T4"])
    ds = NiftiFolderDataset(tmp_path, [stage], columns={"stage": "T_stage"}, n_classes=2)
    item = ds[1]
    assert item["id"] == "p2" and item["attr"] == 2 and item["group"] == "T3"
    assert item["image"].shape == (1, 4, 5, 6) and item["label"].shape == (4, 5, 6)  # canonical (z, y, x)
    from napari_dmoe.io.images import read_image

    np.testing.assert_array_equal(item["label"], read_image(tmp_path / "labels" / "p2.nii.gz").array)
    assert item["label"].sum() == 8
    report = check_dataset(ds)
    assert report.counts == {"T1": 1, "T2": 0, "T3": 2, "T4": 0}
    assert sum("no items" in w for w in report.warnings) == 2
    resized = NiftiFolderDataset(tmp_path, [stage], columns={"stage": "T_stage"}, size=(8, 8, 8))[0]
    assert resized["image"].shape == (1, 8, 8, 8) and set(np.unique(resized["label"])) == {0, 1}


def test_nifti_folder_skips_cases_without_attribute_and_errors(tmp_path):
    make_nifti_folder(tmp_path, {"p1": "T1", "p2": None, "p3": "T2"})
    stage = Attribute("T_stage", ["T1", "T2", "T3", "T4"])
    ds = NiftiFolderDataset(tmp_path, [stage], n_classes=2)
    assert [r.id for r in ds.records] == ["p1", "p3"] and ds.skipped["no CSV row"] == 1
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 3), np.uint8), np.eye(4)), tmp_path / "labels" / "p3.nii.gz")
    with pytest.raises(DatasetError, match=r"p3.nii.gz: mask size \(3, 5, 6\) does not match"):
        ds[1]
    nib.save(nib.Nifti1Image(np.full((6, 5, 4), 4, np.uint8), np.eye(4)), tmp_path / "labels" / "p3.nii.gz")
    with pytest.raises(DatasetError, match=r"unexpected values \[4\]"):
        check_dataset(ds)
    with pytest.raises(DatasetError, match="missing column"):
        NiftiFolderDataset(tmp_path, [Attribute("grade", ["1"])])
    (tmp_path / "labels" / "p1.nii.gz").unlink()
    with pytest.raises(DatasetError, match="p1"):
        NiftiFolderDataset(tmp_path, [stage])


# -- generic folder ---------------------------------------------------------------------------------------
def test_generic_folder_with_label_map_and_errors(tmp_path):
    rows = []
    for i, sex in enumerate(["female", "male", ""]):
        iio.imwrite(tmp_path / f"img{i}.png", np.full((12, 10), 30 * i, np.uint8))
        mask = np.zeros((12, 10), np.uint8)
        mask[2:6, 3:7] = 255
        iio.imwrite(tmp_path / f"img{i}_mask.png", mask)
        rows.append([f"img{i}.png", f"img{i}_mask.png", sex, "40"])
    csv_path = write_csv(tmp_path / "list.csv", ["image", "mask", "sex", "age"], rows)
    vocab = [Attribute("sex", ["female", "male"]), Attribute("age", list(AGE_BINS))]
    ds = GenericFolderDataset(csv_path, vocab, label_map={0: 0, 255: 1}, size=(6, 5))
    assert len(ds) == 2 and ds.skipped["missing sex"] == 1
    item = ds[1]
    assert item["group"] == "male/40-59" and item["attr"] == 1 * 5 + 2
    assert item["image"].shape == (1, 6, 5) and item["label"].max() == 1
    with pytest.raises(DatasetError, match=r"unexpected values \[255\]"):
        GenericFolderDataset(csv_path, vocab, n_classes=2)[0]
    write_csv(tmp_path / "broken.csv", ["image", "mask", "sex", "age"], [["nope.png", "img0_mask.png", "male", 3]])
    with pytest.raises(DatasetError, match="line 2: file .*nope.png not found"):
        GenericFolderDataset(tmp_path / "broken.csv", vocab)
