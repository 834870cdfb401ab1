"""Datasets of a training config: train/val/test splits, the attribute vocabulary, seeded augmentation.

The vocabulary is the list of config attributes (not the spec), so ``item["attr"]`` is always the index of the
attribute *combination* (what FEBS and per-group validation need); the engine maps it to a router index.

Geometry (3D): with a target spacing (``spec.spacing``), training items are resampled to it the way inference
does (normalise the whole volume, then the same linear resize to the same grid; labels nearest) before the
patches are cropped; validation items stay on the file's grid and raw, because validation segments them with the
inference engine exactly as ``dmoe evaluate`` does (see ``validate.py``). Files without a voxel size are used as
they are (``check_dataset`` warns).

Augmentations are MONAI dict transforms reseeded for every item from (seed, epoch, index): the stream of
augmented samples does not depend on the number of workers or processes, and a resumed run sees exactly the
samples an uninterrupted run would.
"""
from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from napari_dmoe.datasets.base import DatasetError, SegmentationDataset, resample_pair
from napari_dmoe.model.spec import Attribute, ModelSpec
from napari_dmoe.transforms import normalize

from napari_dmoe.training.config import DEFAULT_CLASSES, SCHEMA, ConfigError
from napari_dmoe.model.routers import group_name

SPLITS = ("train", "val", "test")


def vocabulary(config: Mapping[str, Any]) -> list[Attribute]:
    return [Attribute(a["name"], list(a["values"])) for a in config["data"]["attributes"]]


def class_names(config: Mapping[str, Any]) -> list[str]:
    data = config["data"]
    if data["class_names"] is not None:
        return list(data["class_names"])
    if data["format"] == "nnunet":  # dataset.json's labels, in label order
        from napari_dmoe.datasets.nnunet import class_names as nnunet_classes

        return nnunet_classes(data["root"])
    return list(DEFAULT_CLASSES.get(data["format"], ["background", "foreground"]))


def make_dataset(config: Mapping[str, Any], split: str, size: Sequence[int] | None,
                 spacing: Sequence[float] | None = None) -> SegmentationDataset:
    """The ``split`` ("train", "val", "test") of the config's dataset; items resampled to the voxel size
    ``spacing`` (mm; files that give one) and resized to ``size``, each if given."""
    if split not in SPLITS:
        raise ConfigError(f"split {split!r}: expected one of {list(SPLITS)}")
    data, seed = config["data"], int(config["seed"])
    vocab, root = vocabulary(config), Path(data["root"])
    n_classes = len(class_names(config))
    fmt = data["format"]
    if fmt == "ham10000":
        from napari_dmoe.datasets.formats import HAM10000Dataset

        v, t = data["val_fraction"], data["test_fraction"]
        return HAM10000Dataset(root, vocab, split=split, fractions=(1 - v - t, v, t), seed=seed, size=size)
    if fmt == "fairseg":
        from napari_dmoe.datasets.formats import FairSegDataset

        if split == "test":
            listing = data["test_list"] or ("test.txt" if (root / "test.txt").is_file() else None)
            if listing is None:
                raise ConfigError(f"config key 'data.test_list': no test list given and {root / 'test.txt'} not found")
            return FairSegDataset(root, vocab, names=listing, size=size, crop=data["crop"])
        listing = data["train_list"] or ("train.txt" if (root / "train.txt").is_file() else None)
        ds = FairSegDataset(root, vocab, names=listing, size=size, crop=data["crop"])
        keep = _fraction_split([r.id for r in ds.records], {"val": data["val_fraction"]}, seed)
        return _subset(ds, keep, split)
    if fmt == "nnunet":
        from napari_dmoe.datasets.nnunet import NnUNetRawDataset

        csv_name = data["csv"] or "attributes.csv"
        ds = NnUNetRawDataset(root, vocab, csv_path=csv_name, size=size, spacing=spacing)
        if data["class_names"] is not None and len(data["class_names"]) != ds.n_classes:
            raise ConfigError(f"config key 'data.class_names': {len(data['class_names'])} names but "
                              f"{root / 'dataset.json'} has {ds.n_classes} labels {ds.info['labels']}")
        table = root / csv_name if not Path(csv_name).is_absolute() else Path(csv_name)
        return _subset(ds, _split_of(ds, data, seed, table, "case_id"), split)
    if fmt == "nifti":
        from napari_dmoe.datasets.formats import NiftiFolderDataset

        csv_name = data["csv"] or "attributes.csv"
        ds = NiftiFolderDataset(root, vocab, csv_path=csv_name, n_classes=n_classes, size=size, spacing=spacing)
        table = root / csv_name if not Path(csv_name).is_absolute() else Path(csv_name)
        return _subset(ds, _split_of(ds, data, seed, table, "case_id"), split)
    from napari_dmoe.datasets.formats import GenericFolderDataset

    table = root / (data["csv"] or "dataset.csv")
    label_map = {int(k): int(v) for k, v in data["label_map"].items()} if data["label_map"] else None
    ds = GenericFolderDataset(table, vocab, label_map=label_map, n_classes=n_classes, size=size, spacing=spacing)
    return _subset(ds, _split_of(ds, data, seed, table, "image", by_stem=True), split)


def _split_of(ds: SegmentationDataset, data: Mapping[str, Any], seed: int, table: Path, id_column: str,
              by_stem: bool = False) -> dict[str, str]:
    """id -> split: from the CSV's ``split_column`` when given, else seeded fractions."""
    column = data["split_column"]
    if column is None:
        fractions = {"test": data["test_fraction"], "val": data["val_fraction"]}
        return _fraction_split([r.id for r in ds.records], fractions, seed)
    with open(table, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or column not in rows[0]:
        raise ConfigError(f"config key 'data.split_column': {table} has no column {column!r}")
    out = {}
    for row in rows:
        key = Path(row[id_column]).stem if by_stem else row[id_column]
        value = row[column].strip().lower()
        if value not in SPLITS:
            raise DatasetError(f"{table}: {id_column}={row[id_column]!r} has split {row[column]!r}; "
                               f"expected one of {list(SPLITS)}")
        out[key] = value
    return out


def _fraction_split(ids: Sequence[str], fractions: Mapping[str, float], seed: int) -> dict[str, str]:
    """Seeded split of sorted ids: the first of a permutation go to each named split, the rest to train."""
    ids = sorted(ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    out, start = {}, 0
    for name, fraction in fractions.items():
        n = int(round(fraction * len(ids)))
        if fraction > 0 and len(ids) >= 3:
            n = max(n, 1)  # a tiny dataset still gets one case to validate on
        for i in order[start:start + n]:
            out[ids[i]] = name
        start += n
    for i in order[start:]:
        out[ids[i]] = "train"
    return out


def _subset(ds: SegmentationDataset, split_of: Mapping[str, str], split: str) -> SegmentationDataset:
    ds.records = [r for r in ds.records if split_of.get(r.id, "train") == split]
    return ds


def group_counts(ds: SegmentationDataset) -> dict[str, int]:
    """Items per attribute combination, every combination of the vocabulary listed (0 when absent)."""
    counts = Counter(group_name(r.values) for r in ds.records)
    return {g: counts.get(g, 0) for g in ds.vocab.groups()}


class TrainItems(Dataset):
    """Normalised, augmented training items; reseeded per item from (seed, epoch, index)."""

    def __init__(self, ds: SegmentationDataset, spec: ModelSpec, augment: Mapping[str, Any], seed: int,
                 crop: bool, group_balance: float = 0.0) -> None:
        self.ds, self.spec, self.seed, self._epoch = ds, spec, seed, 0
        self.transform = _augmentations(spec, augment, crop)
        self.group_balance = float(group_balance)
        self._order: np.ndarray | None = None
        self.epoch = 0

    @property
    def epoch(self) -> int:
        return self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch = int(value)
        self._order = balanced_order(self.ds, self.group_balance, self.seed, self._epoch)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> dict[str, Any]:
        # group-balanced sampling: position -> a record drawn for this epoch (the sampler still shuffles positions)
        index = int(self._order[index]) if self._order is not None else index
        # normalised on the file's grid, then resampled: the order (and resize) of the inference engine
        item, spacing = self.ds.read(index, resample=False)
        image, label = normalize(item["image"], self.spec.normalization), item["label"]
        if self.ds.spacing is not None and spacing is not None:
            image, label, _ = resample_pair(image, label, spacing, self.ds.spacing, item["id"])
        data = {"image": image, "label": label[None]}
        self.transform.set_random_state(seed=(self.seed * 1_000_003 + self.epoch * 10_007 + index) % 2**32)
        out = self.transform(data)
        out = out[0] if isinstance(out, list) else out  # RandCropByPosNegLabeld returns a list of samples
        return {**item, "image": _numpy(out["image"], np.float32), "label": _numpy(out["label"], np.int64)[0]}


def balanced_order(ds: SegmentationDataset, balance: float, seed: int, epoch: int) -> np.ndarray | None:
    """Records to show at each position of an epoch, drawn with weight count(group) ** -balance (None: as they
    come). 1 shows every group equally often, 0.5 each in proportion to the square root of its count: the rare
    groups' few images are seen more often without being repeated as often as full balance needs. Seeded by
    (seed, epoch), so a resumed run draws the same images."""
    if balance <= 0 or not len(ds):
        return None
    groups = [group_name(r.values) for r in ds.records]
    counts = Counter(groups)
    weights = np.array([counts[g] ** -balance for g in groups], float)
    rng = np.random.default_rng([seed % 2**32, epoch, 7919])
    return rng.choice(len(groups), size=len(groups), replace=True, p=weights / weights.sum())


class EvalItems(Dataset):
    """Validation items without augmentation. 2D: normalised, at the model's input size. 3D: raw, on the file's
    grid, with ``spacing`` (the file's voxel size, None when unknown) and ``values`` (attribute name -> value),
    what ``validate`` hands to the inference engine."""

    def __init__(self, ds: SegmentationDataset, spec: ModelSpec) -> None:
        self.ds, self.spec = ds, spec

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.spec.spatial_dims == 3:
            item, spacing = self.ds.read(index, resample=False)
            values = dict(zip(self.ds.vocab.names, self.ds.records[index].values))
            return {**item, "spacing": spacing, "values": values}
        item = self.ds[index]
        return {**item, "image": normalize(item["image"], self.spec.normalization)}


def _numpy(x: Any, dtype: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=dtype)


def _augmentations(spec: ModelSpec, augment: Mapping[str, Any], crop: bool) -> Any:
    from monai.transforms import (Compose, RandCropByPosNegLabeld, RandFlipd, RandRotate90d, RandRotated,
                                  RandScaleIntensityd, RandShiftIntensityd, SpatialPadd)

    # the schema's defaults under what was given: a caller may name only the augmentations it wants (the site
    # transforms are then off, as in a config that leaves them out)
    augment = {k: f.default for k, f in SCHEMA["augment"].items()} | dict(augment)
    keys, p, dims = ["image", "label"], float(augment["prob"]), spec.spatial_dims
    steps: list[Any] = []
    if crop:  # 3D: patches of the model's input size, half centred on foreground (nnU-Net/MONAI practice)
        steps += [SpatialPadd(keys, spec.input_size),
                  RandCropByPosNegLabeld(keys, "label", spec.input_size, pos=1, neg=1, num_samples=1,
                                         allow_smaller=True)]
    if augment["flip"]:
        steps += [RandFlipd(keys, prob=p, spatial_axis=axis) for axis in range(dims)]
    if augment["rotate90"]:
        steps.append(RandRotate90d(keys, prob=p, spatial_axes=(dims - 2, dims - 1)))  # in-plane (y, x)
    if augment["rotate_degrees"]:
        angle = np.deg2rad(augment["rotate_degrees"])
        ranges = {"range_x": angle} if dims == 2 else {"range_z": angle}
        steps.append(RandRotated(keys, prob=p, mode=("bilinear", "nearest"), padding_mode="zeros", **ranges))
    if augment["intensity"]:
        steps += [RandScaleIntensityd("image", factors=augment["intensity"], prob=p),
                  RandShiftIntensityd("image", offsets=augment["intensity"], prob=p)]
    return Compose(steps + _site_augmentations(augment, float(augment["site_prob"]), dims))


def _site_augmentations(augment: Mapping[str, Any], p: float, dims: int) -> list[Any]:
    """Scanner and clinic differences (MONAI transforms; all but the zoom on the image only): colour, contrast,
    gamma, field of view (zoom, image and label), bias field, resolution loss, blur, noise, in the order an
    acquisition adds them (noise last, after the optics)."""
    from monai.transforms import (RandAdjustContrastd, RandBiasFieldd, RandGaussianNoised, RandGaussianSmoothd,
                                  RandScaleIntensityd, RandScaleIntensityFixedMeand, RandSimulateLowResolutiond,
                                  RandZoomd)

    img, steps = "image", []
    if augment["colour"]:  # RGB colour jitter: an independent gain per channel
        steps.append(RandScaleIntensityd(img, factors=augment["colour"], prob=p, channel_wise=True))
    if augment["contrast"]:
        steps.append(RandScaleIntensityFixedMeand(img, factors=augment["contrast"], prob=p, preserve_range=False))
    if augment["gamma"]:
        steps.append(RandAdjustContrastd(img, gamma=tuple(augment["gamma"]), prob=p))
    if augment["zoom"]:  # field of view / optics magnification: the same anatomy larger or smaller in the frame
        z = float(augment["zoom"])
        # labels "nearest-exact": torch's plain "nearest" is half a pixel off the bilinear image grid
        steps.append(RandZoomd(["image", "label"], prob=p, min_zoom=1 - z, max_zoom=1 + z,
                               mode=("bilinear" if dims == 2 else "trilinear", "nearest-exact"), keep_size=True))
    if augment["bias_field"]:
        steps.append(RandBiasFieldd(img, coeff_range=(0.0, augment["bias_field"]), prob=p))
    if augment["low_res"]:
        up = "trilinear" if dims == 3 else "bilinear"  # MONAI's default (trilinear) refuses 2D images
        steps.append(RandSimulateLowResolutiond(img, zoom_range=(augment["low_res"], 1.0), prob=p,
                                                upsample_mode=up))
    if augment["blur"]:
        sigma = (0.25, float(augment["blur"]))
        sigmas = {"sigma_x": sigma, "sigma_y": sigma, **({"sigma_z": sigma} if dims == 3 else {})}
        steps.append(RandGaussianSmoothd(img, prob=p, **sigmas))
    if augment["noise"]:
        steps.append(RandGaussianNoised(img, prob=p, std=augment["noise"], sample_std=True))
    return steps
