"""Shared parts of the training datasets: attribute vocabulary, records, mask mapping, resampling, checks.

Items are dicts ``{"image": float32 ndarray [C, *spatial], "label": int64 ndarray [*spatial],
"attr": int router index, "group": str, "id": str}``. Arrays stay numpy (torch's default collate turns
them into tensors); intensities are raw (normalisation is `transforms.normalize`, per model spec).

Geometry: with a target ``spacing`` (a 3D model's ``spec.spacing``, z, y, x in mm), a volume whose file gives
its voxel size (NIfTI, DICOM) is resampled to that spacing by `resample_pair`: image linear, label nearest, on
the grid inference works on (``transforms.resampled_shape`` and ``transforms.resize``, shared with the inference
engine), so training sees voxels of the size the model is later run at. Volumes without a
known voxel size (TIFF, PNG) are used on their own grid and counted by `check_dataset`. ``size`` (optional)
then resizes to a fixed size.
"""
from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from torch.utils.data import Dataset

from napari_dmoe.model.spec import Attribute
from napari_dmoe.transforms import resampled_shape, resize_image, resize_labels
from napari_dmoe.model.routers import group_name

AGE_BINS = ("0-19", "20-39", "40-59", "60-79", "80+")
MISSING = {"", "nan", "none", "na", "n/a", "-1"}


class DatasetError(ValueError):
    """A dataset on disk does not match what was asked; the message names the file and the problem."""


def age_bin(years: float) -> str:
    """Age in years -> one of AGE_BINS (the dMoE HAM10000 vocabulary)."""
    if years < 0 or math.isnan(years):
        raise DatasetError(f"age {years} is not a valid age in years")
    return AGE_BINS[min(int(years // 20), len(AGE_BINS) - 1)]


class Vocabulary:
    """Attribute vocabularies -> router indices, numbered exactly like `ModelSpec.router_index`."""

    def __init__(self, attributes: Any) -> None:
        self._spec = attributes if hasattr(attributes, "router_index") else None
        attrs = attributes.attributes if self._spec is not None else attributes
        if isinstance(attrs, (Attribute, Mapping)):
            attrs = [attrs]
        self.attributes = [a if isinstance(a, Attribute) else Attribute(**a) for a in attrs]
        if not self.attributes:
            raise DatasetError("no attributes given: pass the model spec or a list of Attribute(name, values)")

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.attributes]

    def router_index(self, values: Sequence[str]) -> int:
        if self._spec is not None:
            return int(self._spec.router_index(list(values)))
        index = 0  # mixed radix, first attribute slowest (same as ModelSpec)
        for attr, value in zip(self.attributes, values):
            index = index * len(attr.values) + attr.values.index(value)
        return index

    def groups(self) -> list[str]:
        """Every combination of values, as group names."""
        return [group_name(c) for c in itertools.product(*[a.values for a in self.attributes])]

    def decode(self, attr: Attribute, raw: Any, codes: Mapping[int, str] | None = None) -> str | None:
        """Raw value from a file -> vocabulary value; None when missing; DatasetError-free (see resolve)."""
        if raw is None:
            return None
        text = str(raw).strip()
        if text.lower() in MISSING:
            return None
        if text in attr.values:
            return text
        number = _as_number(text)
        if number is not None:
            if list(attr.values) == list(AGE_BINS):
                return age_bin(number)
            if number == int(number) and str(int(number)) in attr.values:
                return str(int(number))
            if codes and int(number) in codes:
                return codes[int(number)]
        return text


def _as_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


@dataclass
class Record:
    id: str
    image: Path
    mask: Path
    values: tuple[str, ...]


@dataclass
class DatasetReport:
    """What a dataset holds before training: group counts, skipped items, problems."""

    n_items: int
    counts: dict[str, int]
    skipped: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    resampled: int = 0  # items whose voxel size differs from the target spacing
    unknown_spacing: int = 0  # items used on their own grid because their file gives no voxel size

    def __str__(self) -> str:
        lines = [f"{self.n_items} items"]
        lines += [f"  {g}: {n}" for g, n in self.counts.items()]
        lines += [f"  skipped ({why}): {n}" for why, n in self.skipped.items() if n]
        if self.resampled or self.unknown_spacing:
            lines.append(f"  resampled to the target spacing: {self.resampled}, "
                         f"spacing unknown (used as is): {self.unknown_spacing}")
        lines += [f"  warning: {w}" for w in self.warnings] + [f"  error: {e}" for e in self.errors]
        return "\n".join(lines)


class SegmentationDataset(Dataset):
    """Base class: subclasses fill `self.records` and implement `load_pair` (and `load` when their files give
    a voxel size). ``spacing``: target voxel size in mm per spatial axis (3D: z, y, x), see the module doc."""

    mask_table: dict[int, int] | None = None  # raw mask value -> class; None: any class in range is fine
    label_hint = ""  # appended to an unexpected-mask-value error: where the allowed values come from

    def __init__(self, vocab: Any, size: Sequence[int] | None = None, n_classes: int | None = None,
                 on_missing: str = "skip", on_unknown: str = "error",
                 transform: Callable[[dict], dict] | None = None, spacing: Sequence[float] | None = None) -> None:
        if on_missing not in ("skip", "error") or on_unknown not in ("skip", "error"):
            raise DatasetError("on_missing and on_unknown must be 'skip' or 'error'")
        self.vocab = vocab if isinstance(vocab, Vocabulary) else Vocabulary(vocab)
        self.size = tuple(int(s) for s in size) if size is not None else None
        self.spacing = tuple(float(s) for s in spacing) if spacing is not None else None
        if self.spacing is not None and (not self.spacing or min(self.spacing) <= 0):
            raise DatasetError(f"target spacing {spacing} must be positive voxel sizes in mm, one per axis")
        self.n_classes = n_classes
        self.on_missing, self.on_unknown = on_missing, on_unknown
        self.transform = transform
        self.records: list[Record] = []
        self.skipped: Counter[str] = Counter()

    # -- building records ----------------------------------------------------------------------------------
    def resolve(self, raw: Mapping[str, Any], source: str, codes: Mapping[str, Mapping[int, str]] | None = None
                ) -> tuple[str, ...] | None:
        """Raw attribute values -> vocabulary values, or None when the item is skipped (and counted)."""
        values = []
        for attr in self.vocab.attributes:
            value = self.vocab.decode(attr, raw.get(attr.name), (codes or {}).get(attr.name))
            if value is None:
                if self.on_missing == "error":
                    raise DatasetError(f"{source}: no value for attribute {attr.name!r}")
                self.skipped[f"missing {attr.name}"] += 1
                return None
            if value not in attr.values:
                if self.on_unknown == "error":
                    raise DatasetError(
                        f"{source}: {attr.name}={value!r} is not in the vocabulary {attr.values}; fix the data, "
                        f"extend the vocabulary, or pass on_unknown='skip'"
                    )
                self.skipped[f"unknown {attr.name}"] += 1
                return None
            values.append(value)
        return tuple(values)

    # -- items ---------------------------------------------------------------------------------------------
    def load_pair(self, rec: Record) -> tuple[np.ndarray, np.ndarray]:
        """(image float32 [C, *spatial], raw mask [*spatial]) before any mapping or resizing."""
        raise NotImplementedError

    def load(self, rec: Record) -> tuple[np.ndarray, np.ndarray, tuple[float, ...] | None]:
        """`load_pair` plus the image's voxel size in mm (None when the file does not give one)."""
        return (*self.load_pair(rec), None)

    def unexpected_values(self, raw: np.ndarray) -> list[int]:
        found = np.unique(raw)
        if self.mask_table is not None:
            return [int(v) for v in found if int(v) not in self.mask_table or v != int(v)]
        top = self.n_classes - 1 if self.n_classes else np.inf
        return [int(v) if v == int(v) else float(v) for v in found if v < 0 or v > top or v != int(v)]

    def map_mask(self, raw: np.ndarray, rec: Record) -> np.ndarray:
        bad = self.unexpected_values(raw)
        if bad:
            allowed = sorted(self.mask_table) if self.mask_table is not None else f"0..{(self.n_classes or 0) - 1}"
            raise DatasetError(f"{rec.mask}: mask has unexpected values {bad[:10]} (allowed: {allowed})")
        if self.mask_table is None:
            return raw.astype(np.int64)
        out = np.zeros(raw.shape, dtype=np.int64)
        for value, cls in self.mask_table.items():
            out[raw == value] = cls
        return out

    def check_shapes(self, image: np.ndarray, raw: np.ndarray, rec: Record) -> None:
        if image.shape[1:] != raw.shape:
            raise DatasetError(
                f"{rec.mask}: mask size {raw.shape} does not match image {rec.image} size {image.shape[1:]}"
            )

    def prepare(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Resize to `self.size` (subclasses may crop first)."""
        if self.size is None:
            return image, label
        return resize_pair(image, label, self.size)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.read(index)[0]

    def read(self, index: int, resample: bool = True) -> tuple[dict[str, Any], tuple[float, ...] | None]:
        """Item ``index`` and the voxel size of its grid (None when unknown). ``resample=False`` keeps the
        file's own grid (validation compares there, as ``dmoe evaluate`` does)."""
        rec = self.records[index]
        image, raw, spacing = self.load(rec)
        self.check_shapes(image, raw, rec)
        label = self.map_mask(raw, rec)
        if resample and self.spacing is not None and spacing is not None:
            image, label, spacing = resample_pair(image, label, spacing, self.spacing, str(rec.image))
        before = image.shape[1:]
        image, label = self.prepare(image, label)
        if spacing is not None and image.shape[1:] != before:  # resized: the voxels grew or shrank
            spacing = tuple(s * b / a for s, b, a in zip(spacing, before, image.shape[1:]))
        item = {"image": image, "label": label, "attr": self.vocab.router_index(rec.values),
                "group": group_name(rec.values), "id": rec.id}
        return (self.transform(item) if self.transform is not None else item), spacing


def resize_pair(image: np.ndarray, label: np.ndarray, size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Image (linear) and label (nearest) to ``size``, with the resize the inference engine uses."""
    return resize_image(image, size), resize_labels(label, size)


def resample_image(image: np.ndarray, spacing: Sequence[float], target: Sequence[float]) -> np.ndarray:
    """``[C, *spatial]`` float image -> the ``target`` voxel size, linearly, exactly as inference resamples."""
    return resize_image(image, resampled_shape(image.shape[1:], spacing, target))


def resample_pair(image: np.ndarray, label: np.ndarray, spacing: Sequence[float], target: Sequence[float],
                  source: str = "image") -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Image (linear) and label (nearest) from voxel size ``spacing`` to ``target`` (mm per axis); also returns
    the voxel size reached (``target`` up to the rounding of the grid size)."""
    if len(spacing) != len(target) or len(target) != image.ndim - 1:
        raise DatasetError(f"{source}: image of spatial shape {image.shape[1:]} with voxel size {tuple(spacing)} "
                           f"cannot be resampled to {tuple(target)} mm; give volumes with one voxel size per axis")
    shape = resampled_shape(image.shape[1:], spacing, target)
    reached = tuple(float(s) * n / m for s, n, m in zip(spacing, image.shape[1:], shape))
    image, label = resize_pair(image, label, shape)
    return image, label, reached


def check_dataset(ds: SegmentationDataset, raise_on_error: bool = True) -> DatasetReport:
    """Read every item once (no resizing) and report group counts, skipped items, bad masks and sizes.

    Unexpected mask values and image/mask size mismatches are errors (raised together as one DatasetError
    unless `raise_on_error=False`); vocabulary groups absent from the data are warnings. With a target
    spacing, items to be resampled are counted and items without a known voxel size are one warning.
    """
    counts = Counter(group_name(r.values) for r in ds.records)
    report = DatasetReport(n_items=len(ds), counts={g: counts.get(g, 0) for g in ds.vocab.groups()},
                           skipped=dict(ds.skipped))
    for group in ds.vocab.groups():
        if counts.get(group, 0) == 0:
            report.warnings.append(f"group {group!r} of the vocabulary has no items in this dataset")
    unknown: list[str] = []
    for rec in ds.records:
        try:
            image, raw, spacing = ds.load(rec)
        except ValueError as err:  # ImageReadError / DatasetError from a bad file
            report.errors.append(str(err))
            continue
        if ds.spacing is not None:
            if spacing is None:
                unknown.append(str(rec.image))
            elif len(spacing) != len(ds.spacing) or len(spacing) != image.ndim - 1:
                report.errors.append(f"{rec.image}: voxel size {tuple(spacing)} does not fit the target spacing "
                                     f"{ds.spacing} mm (one value per axis of a {len(ds.spacing)}D volume)")
            elif resampled_shape(image.shape[1:], spacing, ds.spacing) != tuple(image.shape[1:]):
                report.resampled += 1
        if image.shape[1:] != raw.shape:
            report.errors.append(f"{rec.mask}: mask size {raw.shape} does not match image size {image.shape[1:]}")
        bad = ds.unexpected_values(raw)
        if bad:
            report.errors.append(f"{rec.mask}: mask has unexpected values {bad[:10]}{ds.label_hint}")
    if unknown:
        report.unknown_spacing = len(unknown)
        report.warnings.append(
            f"{len(unknown)} of {len(ds.records)} images give no voxel size (e.g. {unknown[0]}): they are used on "
            f"their own grid, not resampled to the model's spacing {list(ds.spacing or ())} mm; save them as "
            "NIfTI or DICOM with their voxel size so training sees what inference sees")
    if report.errors and raise_on_error:
        shown = report.errors[:10] + ([f"... and {len(report.errors) - 10} more"] if len(report.errors) > 10 else [])
        raise DatasetError("dataset check failed:\n" + "\n".join(shown))
    return report
