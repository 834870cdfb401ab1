"""Tiny datasets in the public formats, written by the training tests (not a test module)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import yaml

RACES = ["Asian", "Black", "White"]


def _disc(size: int, radius: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:size, :size]
    cy, cx = size / 2 + rng.uniform(-3, 3, 2)
    r = np.hypot(yy - cy, xx - cx)
    return r < radius, r < radius * 0.5


def write_fairseg(root: Path, n_train: int = 12, n_test: int = 4, size: int = 40, seed: int = 0) -> Path:
    """FairSeg npz: slo_fundus, disc_cup_mask (0, -1 rim, -2 cup), race code; train.txt / test.txt."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n_train + n_test):
        race = i % 3
        disc, cup = _disc(size, 8 + 2 * race, rng)
        image = (60 + 100 * disc + 60 * cup + rng.normal(0, 10, (size, size))).clip(0, 255).astype(np.uint8)
        mask = np.where(cup, -2, np.where(disc, -1, 0)).astype(np.int8)
        name = f"data_{i:04d}.npz"
        np.savez(root / name, slo_fundus=image, disc_cup_mask=mask, race=np.array(race), gender=np.array(i % 2),
                 age=np.array(20000 + i), ethnicity=np.array(0), language=np.array(0), maritalstatus=np.array(0))
        names.append(name)
    (root / "train.txt").write_text("\n".join(names[:n_train]) + "\n")
    (root / "test.txt").write_text("\n".join(names[n_train:]) + "\n")
    return root


def write_ham10000(root: Path, n: int = 16, shape: tuple[int, int] = (36, 44), seed: int = 0) -> Path:
    """HAM10000 layout: metadata CSV, <id>.jpg, <id>_segmentation.png (255 = lesion); two images per lesion."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        image_id, lesion = f"ISIC_{i:07d}", f"HAM_{i // 2:07d}"
        age = [15, 35, 55, 75, 85][(i // 2) % 5]
        yy, xx = np.mgrid[: shape[0], : shape[1]]
        lesion_mask = np.hypot(yy - shape[0] / 2, xx - shape[1] / 2) < 6 + age / 20
        rgb = np.stack([200 - 120 * lesion_mask] * 3, -1) + rng.normal(0, 5, (*shape, 3))
        Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(root / f"{image_id}.jpg", quality=95)
        Image.fromarray((lesion_mask * 255).astype(np.uint8)).save(root / f"{image_id}_segmentation.png")
        rows.append([lesion, image_id, "nv", "histo", age, "male", "back"])
    with open(root / "HAM10000_metadata.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"])
        w.writerows(rows)
    return root


def write_nifti(root: Path, n: int = 6, shape: tuple[int, int, int] = (24, 24, 16), seed: int = 0) -> Path:
    """images/<case>.nii.gz, labels/<case>.nii.gz, attributes.csv (case_id, stage)."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        stage = ["T1", "T2", "T3", "T4"][i % 4]
        zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]]
        label = (np.hypot(np.hypot(zz - shape[0] / 2, yy - shape[1] / 2), xx - shape[2] / 2) < 4 + i % 4)
        image = (label * 80 + rng.normal(0, 20, shape)).astype(np.int16)
        affine = np.diag([2.0, 2.0, 3.0, 1.0])
        nib.save(nib.Nifti1Image(image, affine), root / "images" / f"case_{i:03d}.nii.gz")
        nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), root / "labels" / f"case_{i:03d}.nii.gz")
        rows.append([f"case_{i:03d}", stage])
    with open(root / "attributes.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "stage"])
        w.writerows(rows)
    return root


def write_folder(root: Path, n: int = 12, size: int = 32, seed: int = 0) -> Path:
    """Generic folder: PNG image/mask pairs + dataset.csv (image, mask, sex, split)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        disc, _ = _disc(size, 6 + 3 * (i % 2), rng)
        image = (50 + 150 * disc + rng.normal(0, 8, (size, size))).clip(0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / f"img_{i:03d}.png")
        Image.fromarray(disc.astype(np.uint8)).save(root / f"img_{i:03d}_mask.png")
        split = "test" if i >= n - 3 else ("val" if i >= n - 5 else "train")
        rows.append([f"img_{i:03d}.png", f"img_{i:03d}_mask.png", ["F", "M"][i % 2], split])
    with open(root / "dataset.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "mask", "sex", "split"])
        w.writerows(rows)
    return root


def tiny_config(path: Path, output_dir: Path, data: dict, method: str = "dmoe", preset: str = "transunet2d-tiny",
                **sections: dict) -> Path:
    """Write a small, fast training config (img 32 for 2D, 64^3 patches for 3D) and return its path."""
    overrides = {"img_size": 32} if preset.startswith("transunet2d") else {}
    config = {
        "name": "test", "seed": 1234, "output_dir": str(output_dir), "method": method, "data": data,
        "model": {"preset": preset, "n_experts": 4, "top_k": 2, "overrides": overrides},
        "recipe": {"steps": 4, "batch_size": 4, "val_every": 2},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
