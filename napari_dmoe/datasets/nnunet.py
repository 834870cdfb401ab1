"""The nnU-Net raw / Medical Segmentation Decathlon layout, plus a CSV of patient attributes.

    <root>/dataset.json        channel_names (or MSD "modality"), labels, file_ending (MSD: .nii.gz)
    <root>/imagesTr/<case>_0000<file_ending>, <case>_0001... one file per channel (nnU-Net v2)
                    <case><file_ending>                     Decathlon: one file (single-channel sets only here;
                                                            convert 4D ones with nnUNetv2_convert_MSD_dataset)
    <root>/labelsTr/<case><file_ending>
    <root>/attributes.csv      case_id + one column per attribute (+ an optional split column)

Labels: nnU-Net v2 writes ``{"background": 0, "tumour": 1}``, the Decathlon ``{"0": "background", "1": "tumour"}``;
both are read, the class names in label order. A label value outside dataset.json's labels, a channel file missing
or extra, a case the CSV names without files, or a case with an image but no label is refused with the file and
what to do. Cases with files but no CSV row are skipped and counted (like the NIfTI folder format).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from napari_dmoe.datasets.base import DatasetError, Record, SegmentationDataset
from napari_dmoe.io.images import read_image

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def read_dataset_json(root: Path) -> dict[str, Any]:
    """``dataset.json`` checked and normalised: channels (names in order), labels (value -> name), file_ending,
    training (MSD case list or None), layout ("nnunet" or "msd")."""
    path = root / "dataset.json"
    if not path.is_file():
        raise DatasetError(f"{path}: not found; an nnU-Net raw / Decathlon folder holds dataset.json, imagesTr/ "
                           "and labelsTr/")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from None
    channels = raw.get("channel_names", raw.get("modality"))
    if not isinstance(channels, dict) or not channels:
        raise DatasetError(f"{path}: field 'channel_names' (or the Decathlon's 'modality') is missing or empty; "
                           'write e.g. "channel_names": {"0": "T2"}')
    try:
        order = sorted(channels, key=int)
    except ValueError:
        raise DatasetError(f"{path}: field 'channel_names': keys must be channel numbers \"0\", \"1\"...") from None
    if [int(k) for k in order] != list(range(len(order))):
        raise DatasetError(f"{path}: field 'channel_names': channels must be numbered 0..{len(order) - 1}, got "
                           f"{order}")
    labels = _labels(raw.get("labels"), path)
    layout = "nnunet" if "channel_names" in raw else "msd"
    ending = raw.get("file_ending", ".nii.gz" if layout == "msd" else None)
    if not isinstance(ending, str) or not ending.startswith("."):
        raise DatasetError(f"{path}: field 'file_ending' is missing; write e.g. \"file_ending\": \".nii.gz\"")
    return {"channels": [str(channels[k]) for k in order], "labels": labels, "file_ending": ending,
            "training": raw.get("training") if layout == "msd" else None, "layout": layout,
            "num_training": raw.get("numTraining"), "path": path}


def _labels(labels: Any, path: Path) -> dict[int, str]:
    if not isinstance(labels, dict) or not labels:
        raise DatasetError(f"{path}: field 'labels' is missing or empty; write e.g. "
                           '"labels": {"background": 0, "prostate": 1}')
    out: dict[int, str] = {}
    for key, value in labels.items():
        if isinstance(value, list):
            raise DatasetError(f"{path}: label {key!r} is a region (a list of values); region-based labels are not "
                               "supported: give every class one integer value")
        value_first = str(key).strip().lstrip("-").isdigit()  # Decathlon: {"0": "background"}
        number, name = (key, value) if value_first else (value, key)
        try:
            number = int(str(number).strip())
        except ValueError:
            raise DatasetError(f"{path}: label {key!r}: {value!r} is not an integer label value") from None
        if number in out:
            raise DatasetError(f"{path}: label value {number} is given twice ({out[number]!r}, {name!r})")
        out[number] = str(name)
    if sorted(out) != list(range(len(out))):
        raise DatasetError(f"{path}: field 'labels': values must be 0..{len(out) - 1} (0 = background), got "
                           f"{sorted(out)}")
    return dict(sorted(out.items()))


def class_names(root: str | Path) -> list[str]:
    """Class names in label order, from dataset.json."""
    return list(read_dataset_json(Path(root))["labels"].values())


class NnUNetRawDataset(SegmentationDataset):
    """Cases of an nnU-Net raw / Decathlon folder with attributes from ``csv_path`` (``id_column`` = case id)."""

    def __init__(self, root: str | Path, vocab: Any, csv_path: str | Path = "attributes.csv",
                 id_column: str = "case_id", columns: Mapping[str, str] | None = None,
                 size: Sequence[int] | None = None, spacing: Sequence[float] | None = None, **kwargs: Any) -> None:
        from napari_dmoe.datasets.formats import attribute_table

        self.root = Path(root)
        self.info = read_dataset_json(self.root)
        super().__init__(vocab, size=size, n_classes=len(self.info["labels"]), spacing=spacing, **kwargs)
        self.mask_table = {v: v for v in self.info["labels"]}
        self.label_hint = (f" (not in dataset.json's labels {self.info['labels']}; add them there or fix the "
                           "label file)")
        self.channel_files = self._cases()
        csv_file, columns, by_case = attribute_table(self.root, csv_path, self.vocab.names, columns, id_column)
        for case in by_case:
            if case not in self.channel_files:
                raise DatasetError(f"{csv_file}: case {case!r} has no image in {self.root / 'imagesTr'} (expected "
                                   f"{self._expected(case)}); remove the row or add the files")
        for case, files in self.channel_files.items():
            label = self._label(case)  # an image without its label is an error, CSV row or not
            if case not in by_case:
                self.skipped["no CSV row"] += 1
                continue
            values = self.resolve({n: by_case[case][c] for n, c in columns.items()}, f"{csv_file} case {case}")
            if values is not None:
                self.records.append(Record(case, files[0], label, values))

    def _expected(self, case: str) -> str:
        end = self.info["file_ending"]
        if self.info["layout"] == "msd":
            return f"{case}{end}"
        return ", ".join(f"{case}_{i:04d}{end}" for i in range(len(self.info["channels"])))

    def _label(self, case: str) -> Path:
        path = self.root / "labelsTr" / f"{case}{self.info['file_ending']}"
        if not path.is_file():
            raise DatasetError(f"{path}: label of case {case!r} not found (every case in imagesTr/ needs one)")
        return path

    def _cases(self) -> dict[str, list[Path]]:
        """case -> its image files in channel order (one file for the Decathlon layout); checks channels."""
        folder, end = self.root / "imagesTr", self.info["file_ending"]
        if not folder.is_dir():
            raise DatasetError(f"{folder}: folder not found (expected imagesTr/<case>_0000{end})")
        names = sorted(p.name[: -len(end)] for p in folder.iterdir() if p.name.endswith(end))
        if self.info["layout"] == "msd":
            cases = {n: [folder / f"{n}{end}"] for n in names if not n.startswith(".")}
            listed = [Path(str(t.get("image", ""))).name[: -len(end)] for t in self.info["training"] or []]
            for case in listed:
                if case not in cases:
                    raise DatasetError(f"{self.info['path']}: case {case!r} is listed under 'training' but "
                                       f"{folder / (case + end)} is not there")
            return {c: cases[c] for c in (listed or cases)}
        cases: dict[str, dict[int, Path]] = {}
        for name in names:
            m = _CHANNEL.match(name)
            if m is None:
                raise DatasetError(f"{folder / (name + end)}: not named <case>_<4-digit channel>{end} (nnU-Net)")
            cases.setdefault(m["case"], {})[int(m["channel"])] = folder / f"{name}{end}"
        n = len(self.info["channels"])
        # one file per case may hold every channel (nnU-Net's RGB PNGs: load checks the count), else one per channel
        whole = n > 1 and all(sorted(files) == [0] for files in cases.values())
        for case, files in cases.items():
            if sorted(files) != list(range(n)) and not whole:
                raise DatasetError(f"{folder}: case {case!r} has channel file(s) {sorted(files)} but dataset.json "
                                   f"names {n} channel(s) {self.info['channels']} (expected {self._expected(case)})")
        if self.info["num_training"] is not None and self.info["num_training"] != len(cases):
            raise DatasetError(f"{self.info['path']}: numTraining is {self.info['num_training']} but imagesTr/ holds "
                               f"{len(cases)} case(s); fix numTraining or add the missing cases")
        return {c: [files[i] for i in sorted(files)] for c, files in cases.items()}

    def load_pair(self, rec: Record) -> tuple[np.ndarray, np.ndarray]:
        return self.load(rec)[:2]

    def load(self, rec: Record) -> tuple[np.ndarray, np.ndarray, tuple[float, ...] | None]:
        files, n = self.channel_files[rec.id], len(self.info["channels"])
        if self.info["layout"] == "msd" and n > 1:  # 4D NIfTI: our reader (and its geometry checks) is 3D only
            raise DatasetError(f"{self.info['path']}: a Decathlon folder with {n} channels keeps them in 4D files; "
                               "convert it to the nnU-Net v2 layout (one file per channel) first, e.g. with "
                               "nnUNetv2_convert_MSD_dataset")
        volumes = [read_image(f) for f in files]
        # channels first; a file may hold several (RGB, or a Decathlon 4D volume with channels on the last axis)
        arrays = [np.asarray(v.array, np.float32) for v in volumes]
        arrays = [np.moveaxis(a, -1, 0) if a.ndim > len(v.spacing) else a[None] for a, v in zip(arrays, volumes)]
        shapes = {a.shape[1:] for a in arrays}
        if len(shapes) > 1:
            raise DatasetError(f"{files[0].parent}: the channel files of case {rec.id!r} differ in size "
                               f"{sorted(shapes)}; every channel must be on the same grid")
        image = np.concatenate(arrays)
        if image.shape[0] != n:
            raise DatasetError(f"{files[0]}: {image.shape[0]} channel(s) but dataset.json names {n} "
                               f"{self.info['channels']}; fix channel_names or the image")
        return image, read_image(rec.mask).array, volumes[0].known_spacing

    def map_mask(self, raw: np.ndarray, rec: Record) -> np.ndarray:
        bad = self.unexpected_values(raw)
        if bad:
            raise DatasetError(f"{rec.mask}: label value(s) {bad[:10]}{self.label_hint}")
        return raw.astype(np.int64)
