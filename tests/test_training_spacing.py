"""3D training sees voxels at the model's spacing, resampled exactly as inference does; validation segments like
``dmoe evaluate``; files without a voxel size are used as they are and counted."""
from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch

from napari_dmoe.datasets.base import check_dataset, resample_image, resampled_shape
from napari_dmoe.datasets.formats import GenericFolderDataset, NiftiFolderDataset
from napari_dmoe.model import make_spec
from napari_dmoe.model.spec import Attribute

STAGE = Attribute("stage", ["T1", "T2"])
TARGET = (3.0, 3.0, 3.0)


def _case(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(z, y, x) image and labels: a box of class 1 with a smaller box of class 2 inside, intensity = class."""
    rng = np.random.default_rng(seed)
    z, y, x = shape
    labels = np.zeros(shape, np.uint8)
    labels[z // 4: 3 * z // 4, y // 4: 3 * y // 4, x // 5: 4 * x // 5] = 1
    labels[3 * z // 8: 5 * z // 8, 3 * y // 8: 5 * y // 8, 2 * x // 5: 3 * x // 5] = 2
    image = (100.0 * labels + rng.normal(0, 5, shape)).astype(np.float32)
    return image, labels


def _save(path: Path, array: np.ndarray, zooms_xyz: tuple[float, float, float]) -> None:
    nib.save(nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), np.diag([*zooms_xyz, 1.0])), path)


def _nifti_folder(root: Path, n: int = 3, shape=(10, 24, 30), zooms_xyz=(1.5, 1.5, 3.0)) -> Path:
    """A NIfTI folder whose volumes are 3 mm in z and 1.5 mm in y, x (napari order (3, 1.5, 1.5))."""
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    with open(root / "attributes.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "stage"])
        for i in range(n):
            image, labels = _case(shape, i)
            _save(root / "images" / f"c{i}.nii.gz", image, zooms_xyz)
            _save(root / "labels" / f"c{i}.nii.gz", labels, zooms_xyz)
            w.writerow([f"c{i}", STAGE.values[i % 2]])
    return root


def test_nifti_items_are_resampled_to_the_target_spacing(tmp_path):
    root = _nifti_folder(tmp_path)
    ds = NiftiFolderDataset(root, [STAGE], n_classes=3, spacing=TARGET)
    item, spacing = ds.read(0)
    # z is already 3 mm; y and x go from 1.5 mm to 3 mm: halved
    assert item["image"].shape == (1, 10, 12, 15) and item["label"].shape == (10, 12, 15)
    assert spacing == pytest.approx(TARGET)
    assert item["label"].dtype == np.int64 and set(np.unique(item["label"])) == {0, 1, 2}  # nearest: no new values
    native, native_spacing = ds.read(0, resample=False)
    assert native["image"].shape == (1, 10, 24, 30) and native_spacing == pytest.approx((3.0, 1.5, 1.5))
    # the structure stays where it was in mm: centroids of class 1 agree to within half a target voxel
    # (voxel i of a grid with voxel size s has its centre at (i + 0.5) * s from the volume's edge)
    for cls in (1, 2):
        before = (np.argwhere(native["label"] == cls).mean(0) + 0.5) * (3.0, 1.5, 1.5)
        after = (np.argwhere(item["label"] == cls).mean(0) + 0.5) * np.array(TARGET)
        assert np.abs(before - after).max() <= 1.5, cls
    # the class volumes in mm^3 survive the nearest-neighbour resampling roughly
    assert (item["label"] == 1).sum() * 27 == pytest.approx((native["label"] == 1).sum() * 3 * 1.5 * 1.5, rel=0.2)
    assert ds[0]["image"].shape == item["image"].shape  # plain indexing is the resampled item
    report = check_dataset(ds)
    assert report.resampled == 3 and report.unknown_spacing == 0 and not report.errors
    plain = NiftiFolderDataset(root, [STAGE], n_classes=3)  # no target: the file's own grid, as before
    assert plain[0]["image"].shape == (1, 10, 24, 30) and check_dataset(plain).resampled == 0


def test_training_resamples_exactly_as_inference():
    """Same grid as the inference plan and the same values as the streamed 3D input (VolumeInput)."""
    from napari_dmoe.inference.plan import make_plan
    from napari_dmoe.inference.volume_input import VolumeInput

    spec = make_spec("resunet3d-tiny", "stage", STAGE.values, ["bg", "fg"], spacing=list(TARGET),
                     normalization={"kind": "zscore"})
    for shape, spacing in [((10, 24, 30), (3.0, 1.5, 1.5)), ((17, 33, 41), (2.5, 0.8, 0.8)), ((9, 9, 9), (4, 4, 4))]:
        plan = make_plan(spec, shape, spacing, None, 0.25)
        assert resampled_shape(shape, spacing, TARGET) == plan.work, shape
    from napari_dmoe.transforms import normalize

    image, _ = _case((17, 33, 41), 0)
    spacing = (2.5, 0.8, 0.8)
    plan = make_plan(spec, image.shape, spacing, None, 0.25)
    windowed = VolumeInput(spec, image, False, plan).window((0, 0, 0), plan.padded)
    inference = windowed[(slice(None), *(slice(0, w) for w in plan.work))].numpy()
    training = resample_image(normalize(image[None], spec.normalization), spacing, TARGET)
    assert training.shape == inference.shape == (1, *plan.work)
    np.testing.assert_allclose(training, inference, atol=1e-4)


def test_training_items_are_normalised_then_resampled(tmp_path):
    """TrainItems (before patching): the inference order, normalise on the file's grid, then resample."""
    from napari_dmoe.training.data import TrainItems
    from napari_dmoe.transforms import normalize

    spec = make_spec("resunet3d-tiny", "stage", STAGE.values, ["bg", "rim", "core"], spacing=list(TARGET),
                     normalization={"kind": "window", "low": 0, "high": 150})
    ds = NiftiFolderDataset(_nifti_folder(tmp_path, n=1), [STAGE], n_classes=3, spacing=TARGET)
    no_augment = {"prob": 0.0, "flip": False, "rotate90": False, "rotate_degrees": 0, "intensity": 0}
    item = TrainItems(ds, spec, no_augment, seed=0, crop=False)[0]
    native, spacing = ds.read(0, resample=False)
    expected = resample_image(normalize(native["image"], spec.normalization), spacing, TARGET)
    assert item["image"].shape == (1, 10, 12, 15) and item["label"].shape == (10, 12, 15)
    np.testing.assert_allclose(item["image"], expected, atol=1e-6)
    np.testing.assert_array_equal(item["label"], ds[0]["label"])  # the dataset's own resampled labels


def test_unknown_spacing_is_used_as_is_and_counted(tmp_path):
    image, labels = _case((10, 24, 30), 1)
    tifffile.imwrite(tmp_path / "a.tif", image)  # TIFF stores no voxel size
    tifffile.imwrite(tmp_path / "a_mask.tif", labels)
    _save(tmp_path / "b.nii.gz", image, (1.5, 1.5, 3.0))
    _save(tmp_path / "b_mask.nii.gz", labels, (1.5, 1.5, 3.0))
    (tmp_path / "list.csv").write_text("image,mask,stage\na.tif,a_mask.tif,T1\nb.nii.gz,b_mask.nii.gz,T2\n")
    ds = GenericFolderDataset(tmp_path / "list.csv", [STAGE], n_classes=3, spacing=TARGET)
    tiff, tiff_spacing = ds.read(0)
    assert tiff["image"].shape == (1, 10, 24, 30) and tiff_spacing is None
    np.testing.assert_array_equal(tiff["label"], labels)
    assert ds[1]["image"].shape == (1, 10, 12, 15)
    report = check_dataset(ds)
    assert report.unknown_spacing == 1 and report.resampled == 1
    warned = [w for w in report.warnings if "no voxel size" in w]
    assert len(warned) == 1 and "a.tif" in warned[0] and "[3.0, 3.0, 3.0]" in warned[0]
    assert "spacing unknown (used as is): 1" in str(report)


def test_a_2d_image_cannot_take_a_3d_spacing():
    from napari_dmoe.datasets.base import DatasetError, resample_pair

    with pytest.raises(DatasetError, match="cannot be resampled"):
        resample_pair(np.zeros((1, 12, 10), np.float32), np.zeros((12, 10), np.int64), (1.0, 1.0), TARGET)


class _Threshold(torch.nn.Module):
    """A 'network' that segments by intensity (class = round(x / 100) after z-scoring is undone): validation's
    Dice then measures only the geometry, resampling there and back."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor([mean, std]))

    def forward(self, x: torch.Tensor, attr: torch.Tensor) -> torch.Tensor:
        raw = x * self.scale[1] + self.scale[0]
        centres = torch.tensor([0.0, 100.0, 200.0], device=x.device).view(1, 3, 1, 1, 1)
        return -((raw - centres) ** 2) / 100.0  # [B, 3, *roi]: nearest class centre wins


def test_validation_segments_like_evaluate(tmp_path):
    """Validation items stay on the file's grid; their Dice is the one ``dmoe evaluate`` computes."""
    from napari_dmoe.evaluation.loop import dataset_cases, evaluate_cases
    from napari_dmoe.evaluation.metrics import mean_dice
    from napari_dmoe.io.images import read_image
    from napari_dmoe.training.data import EvalItems
    from napari_dmoe.training.validate import _Model, validate

    root = _nifti_folder(tmp_path, n=2)
    spec = make_spec("resunet3d-tiny", "stage", STAGE.values, ["bg", "rim", "core"], spacing=list(TARGET),
                     normalization={"kind": "zscore"})
    ds = NiftiFolderDataset(root, [STAGE], n_classes=3, spacing=TARGET)
    items = EvalItems(ds, spec)
    item = items[0]
    assert item["image"].shape == (1, 10, 24, 30) and item["spacing"] == pytest.approx((3.0, 1.5, 1.5))
    assert item["values"] == {"stage": "T1"}
    volume = read_image(root / "images" / "c0.nii.gz").array
    network = _Threshold(float(volume.mean()), float(volume.std()))
    metrics = validate(network, items, spec, torch.device("cpu"), lambda g: g)
    assert metrics["n"] == 2
    # what `dmoe evaluate` does: every case of the dataset on the file's grid through the one evaluation loop
    expected = evaluate_cases(_Model(spec, network), dataset_cases(ds), device="cpu", routing=False)
    assert [r.id for r in expected.records] == [r.id for r in ds.records]
    assert metrics["dice"] == pytest.approx(float(np.mean([mean_dice(r) for r in expected.records])), abs=1e-6)
    assert metrics["dice"] > 0.8  # resampled to 3 mm and back without shifting the structures


def test_training_run_at_the_model_spacing(tmp_path):
    """A real 2-step run: the data summary says what was resampled, validation runs, the spec keeps the spacing."""
    from training_data import tiny_config

    from napari_dmoe.io.checkpoint import load_model
    from napari_dmoe.training.config import ConfigError, load_config
    from napari_dmoe.training.engine import train

    root = _nifti_folder(tmp_path / "data", n=4)
    data = {"format": "nifti", "root": str(root), "attributes": {"stage": STAGE.values},
            "class_names": ["background", "rim", "core"], "val_fraction": 0.25, "test_fraction": 0.0}
    model = {"preset": "resunet3d-tiny", "overrides": {"input_size": [64, 64, 64], "spacing": list(TARGET)}}
    cfg = tiny_config(tmp_path / "c.yaml", tmp_path / "run", data, preset="resunet3d-tiny", model=model,
                      recipe={"name": "3d", "steps": 2, "batch_size": 2, "val_every": 2})
    best = train(load_config(cfg), device="cpu", quiet=True)
    spec = load_model(best).spec
    assert spec.spacing == list(TARGET) and spec.metrics["n"] == 1
    summary = spec.provenance["data"]
    assert summary["train"]["spacing"] == {"target": list(TARGET), "resampled": 3, "unknown": 0}
    assert summary["val"]["spacing"]["resampled"] == 1
    with pytest.raises(ConfigError, match="data.size"):
        train(load_config(cfg, ["data.size=[64,64,64]", f"output_dir={tmp_path / 'run2'}"]), device="cpu",
              quiet=True)
