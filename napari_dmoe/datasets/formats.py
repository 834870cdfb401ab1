"""Training datasets in public formats: Harvard-FairSeg, HAM10000, NIfTI folder + CSV, generic folder + CSV.

All yield the item dicts described in `data/base.py`; files are read lazily, one item at a time.
Attribute values become router indices through the vocabulary (a ModelSpec or a list of Attribute);
with several attributes the router index is intersectional (`spec.router_index(values)`).
Items whose attribute is missing are skipped and counted in `ds.skipped` (``on_missing="error"`` raises).
With a target ``spacing`` (3D models), NIfTI/DICOM volumes are resampled to it (see `data/base.py`).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from napari_dmoe.datasets.base import DatasetError, Record, SegmentationDataset, resize_pair
from napari_dmoe.io.images import read_image, suffix_of

# Harvard-FairSeg attribute codes (dataset README); values may also be given to the vocabulary as codes "0".."n".
FAIRSEG_CODES: dict[str, dict[int, str]] = {
    "race": {0: "Asian", 1: "Black", 2: "White"},
    "gender": {0: "Female", 1: "Male"},
    "ethnicity": {0: "Non-Hispanic", 1: "Hispanic"},
    "language": {0: "English", 1: "Spanish", 2: "Others"},
    "maritalstatus": {0: "Married or Partnered", 1: "Single", 2: "Divorced", 3: "Widowed", 4: "Legally Separated"},
}
FAIRSEG_ATTRIBUTES = (*FAIRSEG_CODES, "age")


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise DatasetError(f"{path}: CSV file not found")
    with open(path, newline="", encoding="utf-8-sig") as fh:  # utf-8-sig: Excel writes a BOM
        rows = list(csv.DictReader(fh))
    return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in rows]


def _require_columns(path: Path, rows: list[dict[str, str]], columns: Sequence[str]) -> None:
    have = set(rows[0]) if rows else set()
    missing = [c for c in columns if c not in have]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {missing}; the file has {sorted(have)}")


def attribute_table(root: Path, csv_path: str | Path, names: Sequence[str], columns: Mapping[str, str] | None,
                    id_column: str) -> tuple[Path, dict[str, str], dict[str, dict[str, str]]]:
    """The attribute CSV of a folder dataset (NIfTI folder, nnU-Net raw): its path (relative to ``root`` unless
    absolute), attribute -> column (``columns`` renames, default the attribute's own name) and case id -> row,
    every needed column checked."""
    csv_file = Path(csv_path) if Path(csv_path).is_absolute() else root / csv_path
    rows = _read_csv(csv_file)
    named = {name: (columns or {}).get(name, name) for name in names}
    _require_columns(csv_file, rows, [id_column, *named.values()])
    return csv_file, named, {r[id_column]: r for r in rows}


def _channels_first(volume: Any) -> np.ndarray:
    array = np.asarray(volume.array, dtype=np.float32)
    return np.moveaxis(array, -1, 0) if volume.rgb else array[None]


class FairSegDataset(SegmentationDataset):
    """Harvard-FairSeg: one .npz per sample with `slo_fundus`, `disc_cup_mask` and attribute arrays.

    `names`: None (every .npz in `root`), a text file of names (one a line), or a list of names. Masks:
    0 background, -1 rim -> 1, -2 cup -> 2. Preprocessing as FairSeg: centre crop `crop` (when larger),
    then resize to `size`. `age` is stored in days and binned to AGE_BINS when the vocabulary uses them.
    """

    mask_table = {0: 0, -1: 1, -2: 2}

    def __init__(self, root: str | Path, vocab: Any, names: str | Path | Sequence[str] | None = None,
                 size: Sequence[int] | None = (224, 224), crop: int | None = 512, **kwargs: Any) -> None:
        super().__init__(vocab, size=size, n_classes=3, **kwargs)
        self.root, self.crop = Path(root), crop
        for name in self.vocab.names:
            if name not in FAIRSEG_ATTRIBUTES:
                raise DatasetError(f"FairSeg has no attribute {name!r}; choose from {list(FAIRSEG_ATTRIBUTES)}")
        for name in self._names(names):
            path = self.root / (name if name.endswith(".npz") else f"{name}.npz")
            if not path.is_file():
                raise DatasetError(f"{path}: listed sample not found")
            raw = self._attributes(path)
            values = self.resolve(raw, str(path), FAIRSEG_CODES)
            if values is not None:
                self.records.append(Record(path.stem, path, path, values))

    def _names(self, names: str | Path | Sequence[str] | None) -> list[str]:
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: FairSeg folder not found")
        if names is None:
            return sorted(p.name for p in self.root.glob("*.npz"))
        if isinstance(names, (str, Path)):
            listing = Path(names) if Path(names).is_file() else self.root / names
            if not listing.is_file():
                raise DatasetError(f"{names}: name list not found (a text file with one sample name a line)")
            return [ln.strip().split(",")[0] for ln in listing.read_text().splitlines() if ln.strip()]
        return list(names)

    @staticmethod
    def _load(path: Path) -> Any:
        try:
            return np.load(path, allow_pickle=False)  # never unpickle user files
        except Exception as err:  # zipfile.BadZipFile, ValueError, OSError
            raise DatasetError(f"{path}: not a readable .npz file ({err})") from err

    @staticmethod
    def _array(npz: Any, key: str, path: Path) -> np.ndarray:
        if key not in npz.files:
            raise DatasetError(f"{path}: no {key!r} array; the file has {sorted(npz.files)}")
        try:
            return npz[key]
        except ValueError as err:  # object arrays need unpickling, which we refuse for user files
            raise DatasetError(f"{path}: array {key!r} holds Python objects ({err}); save plain numeric arrays") from err

    def _attributes(self, path: Path) -> dict[str, Any]:
        with self._load(path) as npz:
            raw = {}
            for name in self.vocab.names:
                value = self._array(npz, name, path).item()
                raw[name] = value / 365.25 if name == "age" and value >= 0 else value  # days -> years
            return raw

    def load_pair(self, rec: Record) -> tuple[np.ndarray, np.ndarray]:
        with self._load(rec.image) as npz:
            image = np.asarray(self._array(npz, "slo_fundus", rec.image), np.float32)
            mask = np.asarray(self._array(npz, "disc_cup_mask", rec.image))
        image = np.moveaxis(image, -1, 0) if image.ndim == 3 else image[None]
        return image, mask

    def prepare(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.crop is not None:
            from monai.transforms import CenterSpatialCrop  # leaves dimensions smaller than the ROI alone

            crop = CenterSpatialCrop([self.crop] * (image.ndim - 1))
            image, label = np.asarray(crop(image)), np.asarray(crop(label[None]))[0]
        return super().prepare(image, label)


class HAM10000Dataset(SegmentationDataset):
    """HAM10000: metadata CSV, `<image_id>.jpg` images and `<image_id>_segmentation.png` masks (255 = lesion).

    Images and masks are found anywhere under `root`. Rows without age are dropped (`n_dropped_no_age`).
    `split` is "train", "val", "test" or "all": lesions (not images) are shuffled with `seed` and cut by
    `fractions`, so all images of one lesion sit in one split.
    """

    mask_table = {0: 0, 255: 1}

    def __init__(self, root: str | Path, vocab: Any, split: str = "all",
                 fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 1234,
                 metadata: str = "HAM10000_metadata.csv", size: Sequence[int] | None = (224, 224),
                 **kwargs: Any) -> None:
        super().__init__(vocab, size=size, n_classes=2, **kwargs)
        self.root = Path(root)
        if split not in ("train", "val", "test", "all"):
            raise DatasetError(f"split={split!r}: expected 'train', 'val', 'test' or 'all'")
        if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
            raise DatasetError(f"fractions {tuple(fractions)} must be three non-negative numbers summing to 1")
        csv_path = self.root / metadata
        rows = _read_csv(csv_path)
        _require_columns(csv_path, rows, ["lesion_id", "image_id", "age"])
        kept = [r for r in rows if r["age"].lower() not in ("", "nan")]
        self.n_dropped_no_age = len(rows) - len(kept)
        self.skipped["no age"] = self.n_dropped_no_age
        self.lesion_split = self.split_lesions(sorted({r["lesion_id"] for r in kept}), fractions, seed)
        self.lesion_of = {r["image_id"]: r["lesion_id"] for r in kept}
        files = {p.name: p for p in self.root.rglob("*") if p.suffix.lower() in (".jpg", ".png")}
        for row in kept:
            if split != "all" and self.lesion_split[row["lesion_id"]] != split:
                continue
            image, mask = files.get(f"{row['image_id']}.jpg"), files.get(f"{row['image_id']}_segmentation.png")
            if image is None or mask is None:
                missing = f"{row['image_id']}.jpg" if image is None else f"{row['image_id']}_segmentation.png"
                raise DatasetError(f"{self.root}: {missing} (listed in {metadata}) not found under this folder")
            values = self.resolve(row, f"{csv_path} image_id={row['image_id']}")
            if values is not None:
                self.records.append(Record(row["image_id"], image, mask, values))

    @staticmethod
    def split_lesions(lesions: Sequence[str], fractions: Sequence[float], seed: int) -> dict[str, str]:
        """lesion_id -> split name, deterministic for a given set of lesions and seed."""
        order = np.random.default_rng(seed).permutation(len(lesions))
        n_train = int(round(fractions[0] * len(lesions)))
        n_val = int(round(fractions[1] * len(lesions)))
        names = ["train"] * n_train + ["val"] * n_val + ["test"] * (len(lesions) - n_train - n_val)
        return {lesions[i]: names[rank] for rank, i in enumerate(order)}

    def load_pair(self, rec: Record) -> tuple[np.ndarray, np.ndarray]:
        image = _channels_first(read_image(rec.image))
        mask = read_image(rec.mask)
        if mask.rgb:
            raise DatasetError(f"{rec.mask}: mask is a colour image; masks must be single-channel 0/255")
        return image, mask.array


class NiftiFolderDataset(SegmentationDataset):
    """3D: `root/images/<case>.nii.gz` + `root/labels/<case>.nii.gz` + CSV (`case_id`, attribute columns).

    `columns` maps attribute name -> CSV column (default: the attribute's name). Cases without a CSV row
    or with an empty cell are skipped and counted; a CSV row without image or label files is an error.
    Volumes are read in canonical (z, y, x) order; `spacing` (optional, mm, z, y, x) resamples each volume to
    that voxel size, then `size` (optional) resizes it.
    """

    def __init__(self, root: str | Path, vocab: Any, csv_path: str | Path = "attributes.csv",
                 columns: Mapping[str, str] | None = None, id_column: str = "case_id",
                 n_classes: int | None = None, size: Sequence[int] | None = None,
                 spacing: Sequence[float] | None = None, **kwargs: Any) -> None:
        super().__init__(vocab, size=size, n_classes=n_classes, spacing=spacing, **kwargs)
        self.root = Path(root)
        images, labels = self._nifti_files(self.root / "images"), self._nifti_files(self.root / "labels")
        csv_file, columns, by_case = attribute_table(self.root, csv_path, self.vocab.names, columns, id_column)
        for case in by_case:
            if case not in images or case not in labels:
                where = "images/" if case not in images else "labels/"
                raise DatasetError(f"{csv_file}: case {case!r} has no NIfTI file in {self.root / where}")
        for case in sorted(images):
            if case not in labels:
                raise DatasetError(f"{images[case]}: no label file {case}.nii.gz in {self.root / 'labels'}")
            if case not in by_case:
                self.skipped["no CSV row"] += 1
                continue
            raw = {name: by_case[case][col] for name, col in columns.items()}
            values = self.resolve(raw, f"{csv_file} case {case}")
            if values is not None:
                self.records.append(Record(case, images[case], labels[case], values))

    @staticmethod
    def _nifti_files(folder: Path) -> dict[str, Path]:
        if not folder.is_dir():
            raise DatasetError(f"{folder}: folder not found (expected images/ and labels/ with <case>.nii.gz files)")
        out = {}
        for path in sorted(folder.iterdir()):
            suffix = suffix_of(path)
            if suffix in (".nii", ".nii.gz"):
                out[path.name[: -len(suffix)]] = path
        return out

    def load_pair(self, rec: Record) -> tuple[np.ndarray, np.ndarray]:
        return self.load(rec)[:2]

    def load(self, rec: Record) -> tuple[np.ndarray, np.ndarray, tuple[float, ...] | None]:
        volume = read_image(rec.image)
        return _channels_first(volume), read_image(rec.mask).array, volume.known_spacing


class GenericFolderDataset(SegmentationDataset):
    """Image/mask pairs listed in a CSV with columns `image`, `mask` and one column per attribute.

    Paths are relative to the CSV's folder; any format `read_image` knows. `label_map` maps raw mask values
    to classes (e.g. {0: 0, 255: 1}); without it masks must hold classes 0..n_classes-1. `spacing` (optional)
    resamples images whose file gives a voxel size (NIfTI, DICOM); others are used as they are.
    """

    def __init__(self, csv_path: str | Path, vocab: Any, image_column: str = "image", mask_column: str = "mask",
                 columns: Mapping[str, str] | None = None, label_map: Mapping[int, int] | None = None,
                 n_classes: int | None = None, size: Sequence[int] | None = None,
                 spacing: Sequence[float] | None = None, **kwargs: Any) -> None:
        super().__init__(vocab, size=size, n_classes=n_classes, spacing=spacing, **kwargs)
        self.mask_table = {int(k): int(v) for k, v in label_map.items()} if label_map is not None else None
        csv_file = Path(csv_path)
        rows = _read_csv(csv_file)
        columns = {name: (columns or {}).get(name, name) for name in self.vocab.names}
        _require_columns(csv_file, rows, [image_column, mask_column, *columns.values()])
        for line, row in enumerate(rows, start=2):
            image, mask = csv_file.parent / row[image_column], csv_file.parent / row[mask_column]
            for path in (image, mask):
                if not path.is_file():
                    raise DatasetError(f"{csv_file} line {line}: file {path} not found")
            raw = {name: row[col] for name, col in columns.items()}
            values = self.resolve(raw, f"{csv_file} line {line}")
            if values is not None:
                self.records.append(Record(Path(row[image_column]).stem, image, mask, values))

    def load_pair(self, rec: Record) -> tuple[np.ndarray, np.ndarray]:
        return self.load(rec)[:2]

    def load(self, rec: Record) -> tuple[np.ndarray, np.ndarray, tuple[float, ...] | None]:
        mask = read_image(rec.mask)
        if mask.rgb:
            raise DatasetError(f"{rec.mask}: mask is a colour image; save masks single-channel")
        volume = read_image(rec.image)
        return _channels_first(volume), mask.array, volume.known_spacing


__all__ = ["FairSegDataset", "HAM10000Dataset", "NiftiFolderDataset", "GenericFolderDataset", "resize_pair",
           "FAIRSEG_CODES"]
