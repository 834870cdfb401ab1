"""The nnU-Net raw / Decathlon layout plus an attributes CSV: read, trained on with ``dmoe train``, evaluated with
``dmoe evaluate``; a missing case, a label outside dataset.json and a channel mismatch are refused by name."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_dmoe.datasets.base import DatasetError
from napari_dmoe.datasets.nnunet import NnUNetRawDataset, class_names
from napari_dmoe.model.spec import Attribute
from training_data import tiny_config

DMOE = [sys.executable, "-m", "napari_dmoe.cli.main"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STAGE = [Attribute("stage", ["T1", "T2", "T3", "T4"])]


def write_nnunet(root: Path, n: int = 8, shape: tuple[int, int, int] = (16, 24, 24), channels: int = 2,
                 decathlon: bool = False) -> Path:
    """nnU-Net v2 (``<case>_000k.nii.gz`` per channel) or Decathlon (one 4D file) raw folder, 2 labels, CSV."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        case = f"case_{i:03d}"
        zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]]
        r = np.hypot(np.hypot(zz - shape[0] / 2, yy - shape[1] / 2), xx - shape[2] / 2)
        label = (r < 4 + i % 3).astype(np.uint8) + (r < 2).astype(np.uint8)  # 0, 1 gland, 2 lesion
        affine = np.diag([2.0, 2.0, 3.0, 1.0])
        images = [(label * 60 * (c + 1) + rng.normal(0, 15, shape)).astype(np.float32) for c in range(channels)]
        if decathlon:  # one 4D file, channels on the last axis
            nib.save(nib.Nifti1Image(np.stack(images, -1), affine), root / "imagesTr" / f"{case}.nii.gz")
        else:
            for c, im in enumerate(images):
                nib.save(nib.Nifti1Image(im, affine), root / "imagesTr" / f"{case}_{c:04d}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"{case}.nii.gz")
        split = "test" if i >= n - 2 else ("val" if i == n - 3 else "train")
        rows.append([case, ["T1", "T2", "T3", "T4"][i % 4], split])
    names = {str(c): ["T2", "ADC", "DWI"][c] for c in range(channels)}
    if decathlon:
        meta = {"name": "tiny", "modality": names, "labels": {"0": "background", "1": "gland", "2": "lesion"},
                "numTraining": n, "training": [{"image": f"./imagesTr/{r[0]}.nii.gz",
                                                "label": f"./labelsTr/{r[0]}.nii.gz"} for r in rows]}
    else:
        meta = {"channel_names": names, "labels": {"background": 0, "gland": 1, "lesion": 2}, "numTraining": n,
                "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    with open(root / "attributes.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "stage", "split"])
        w.writerows(rows)
    return root


@pytest.mark.parametrize("decathlon", [False, True])
def test_reads_both_layouts(tmp_path: Path, decathlon: bool) -> None:
    root = write_nnunet(tmp_path / "raw", decathlon=decathlon, channels=1 if decathlon else 2)
    ds = NnUNetRawDataset(root, STAGE)
    assert len(ds) == 8 and class_names(root) == ["background", "gland", "lesion"]
    item = ds[0]
    assert item["image"].shape[0] == (1 if decathlon else 2) and item["image"].shape[1:] == item["label"].shape
    assert sorted(item["label"].shape) == [16, 24, 24]
    assert set(np.unique(item["label"])) == {0, 1, 2} and item["group"] == "T1"
    inside = item["label"] == 1
    if not decathlon:  # the channels are the files' in order (channel 1 is twice as bright inside the gland)
        assert item["image"][1][inside].mean() > 1.5 * item["image"][0][inside].mean()


def test_refuses_a_missing_case(tmp_path: Path) -> None:
    root = write_nnunet(tmp_path / "raw")
    with open(root / "attributes.csv", "a", newline="") as fh:
        fh.write("case_999,T2,train\n")
    with pytest.raises(DatasetError, match=r"attributes.csv: case 'case_999' has no image .*case_999_0000\.nii\.gz"):
        NnUNetRawDataset(root, STAGE)
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    (root / "attributes.csv").write_text("case_id,stage\ncase_000,T1\n")
    with pytest.raises(DatasetError, match=r"case_001.nii.gz: label of case 'case_001' not found"):
        NnUNetRawDataset(root, STAGE)


def test_refuses_a_label_outside_dataset_json(tmp_path: Path) -> None:
    root = write_nnunet(tmp_path / "raw")
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "gland": 1}
    (root / "dataset.json").write_text(json.dumps(meta))
    ds = NnUNetRawDataset(root, STAGE)
    with pytest.raises(DatasetError, match=r"label value\(s\) \[2\] \(not in dataset.json's labels"):
        ds[0]


def test_refuses_a_channel_mismatch(tmp_path: Path) -> None:
    root = write_nnunet(tmp_path / "raw")
    (root / "imagesTr" / "case_003_0001.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"case 'case_003' has channel file\(s\) \[0\] but dataset.json names 2"):
        NnUNetRawDataset(root, STAGE)
    root = write_nnunet(tmp_path / "dec", decathlon=True, channels=1)
    meta = json.loads((root / "dataset.json").read_text())
    meta["modality"] = {"0": "T2", "1": "ADC"}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"with 2 channels keeps them in 4D files; convert"):
        NnUNetRawDataset(root, STAGE)[0]


def test_refuses_a_bad_dataset_json(tmp_path: Path) -> None:
    root = write_nnunet(tmp_path / "raw")
    for meta, message in [({"labels": {"background": 0}, "file_ending": ".nii.gz"}, "'channel_names'"),
                          ({"channel_names": {"0": "T2"}, "labels": {"background": 0, "x": 2},
                            "file_ending": ".nii.gz"}, r"values must be 0..1"),
                          ({"channel_names": {"0": "T2"}, "labels": {"background": 0, "x": [1, 2]},
                            "file_ending": ".nii.gz"}, "region-based"),
                          ({"channel_names": {"0": "T2"}, "labels": {"background": 0}}, "'file_ending'")]:
        (root / "dataset.json").write_text(json.dumps(meta))
        with pytest.raises(DatasetError, match=message):
            NnUNetRawDataset(root, STAGE)


@pytest.mark.slow
def test_dmoe_train_and_evaluate_on_nnunet_raw(tmp_path: Path) -> None:
    root = write_nnunet(tmp_path / "raw", n=8, shape=(16, 32, 32))
    data = {"format": "nnunet", "root": str(root), "attributes": "stage", "split_column": "split",
            "normalization": {"kind": "zscore"}}
    cfg = tiny_config(tmp_path / "c.yaml", tmp_path / "run", data, preset="resunet3d-tiny",
                      recipe={"name": "3d", "steps": 2, "batch_size": 2, "val_every": 2})
    proc = subprocess.run([*DMOE, "train", str(cfg), "--events", "-", "--device", "cpu", "--quiet"],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    start = events[0]
    assert start["data"]["train"]["n"] == 5 and start["data"]["val"]["n"] == 1
    from napari_dmoe.io.checkpoint import load_model

    model = load_model(tmp_path / "run" / "best.safetensors")
    assert model.spec.class_names == ["background", "gland", "lesion"] and model.spec.in_channels == 2
    proc = subprocess.run([*DMOE, "evaluate", str(tmp_path / "run" / "best.safetensors"), str(cfg), "--out",
                           str(tmp_path / "ev"), "--n-boot", "10", "--device", "cpu", "--quiet"],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["n_images"] == 2 and report["split"] == "test"
    # a broken label is refused by the CLI in one line naming the file (exit 2, no traceback)
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "gland": 1}
    (root / "dataset.json").write_text(json.dumps(meta))
    proc = subprocess.run([*DMOE, "train", str(cfg), "--set", f"output_dir={tmp_path / 'run2'}", "--device", "cpu",
                           "--quiet"], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "case_000.nii.gz: mask has unexpected values [2] (not in dataset.json's labels" in proc.stderr
