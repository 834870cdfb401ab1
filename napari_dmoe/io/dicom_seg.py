"""Label maps -> DICOM SEG (highdicom, imported lazily) that references the source DICOM images.

A PACS or treatment-planning system loads a mask only as DICOM SEG pointing at the images it was made on, so
each label plane z is tied to the source dataset of that plane in our order: `read_dicom_series` sorts the
slices along the slice normal and records the sorted files and their SOPInstanceUIDs in ``Volume.meta``
(``files``, ``sop_instance_uids``); a single DICOM file (2D, or multi-frame in its own frame order) is one
entry. One BINARY segment per foreground class (label 1..C-1), algorithm type AUTOMATIC, naming napari-dmoe,
its version, and the model file and attribute when known.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from napari_dmoe.io.volume import ImageWriteError, Volume

# DICOM LO (Long String) holds at most 64 characters; longer values make an invalid file
_LO = 64


@dataclass
class SegAlgorithm:
    """What made the labels, written into the SEG's algorithm identification and series description."""

    name: str = "napari-dmoe"
    version: str = ""
    model: str = ""  # model file name, e.g. "prostate.safetensors"
    attribute: str = ""  # attribute used, e.g. "race=Black" or "unknown (averaged)"
    # "automatic": the model's mask as it came; "semiautomatic": a model mask the user edited afterwards;
    # "manual": labels a person drew (no algorithm to name). A reader of the SEG must be able to tell them apart.
    kind: str = "automatic"
    forced: bool = False  # segmented although the image does not fit the model ("Segment anyway", --force)
    findings: Sequence[str] = ()  # what the fit check found

    def __post_init__(self) -> None:
        if self.kind not in ("automatic", "semiautomatic", "manual"):
            raise ValueError(f"kind={self.kind!r}: expected 'automatic', 'semiautomatic' or 'manual'")
        if not self.version:
            from napari_dmoe import __version__

            self.version = __version__


def _lo(text: str) -> str:
    return text.replace("\\", "/")[:_LO]  # backslash separates DICOM multi-values


def require_dicom_source(like: Volume | None, path: str | Path | None = None) -> None:
    """Refuse DICOM SEG output (early, before any inference) for labels not made on a DICOM image."""
    if like is None or (like.meta or {}).get("format") != "dicom":
        source = (like.meta or {}).get("source", "unknown") if like is not None else "unknown"
        prefix = f"{path}: " if path else ""
        raise ImageWriteError(
            f"{prefix}DICOM SEG (.dcm) needs labels made on a DICOM series or file, so it can reference the source "
            f"images; these labels are not (source: {source}). Save as .nii.gz instead"
        )
    files = (like.meta or {}).get("files") or []
    require_seg_attributes(files, path)


def source_files(source: Volume | Sequence[str | Path]) -> tuple[list[Path], list[str] | None]:
    """The source DICOM files in label-plane order, and their SOPInstanceUIDs when the reader recorded them."""
    if not isinstance(source, Volume):
        files = [Path(p) for p in source]
        if not files:
            raise ImageWriteError("DICOM SEG needs the source DICOM files; the list is empty")
        return files, None
    meta = source.meta or {}
    require_dicom_source(source)
    files = meta.get("files")
    if not files:  # a single DICOM file read before the reader recorded `files`
        files = [meta["source"]] if meta.get("source") and Path(meta["source"]).is_file() else []
    if not files:
        raise ImageWriteError(
            "DICOM SEG needs the source DICOM files, and this image's metadata does not list them; reopen the "
            "series with napari-dmoe (File > Open Folder) and segment it again, or save as .nii.gz"
        )
    uids = meta.get("sop_instance_uids")
    return [Path(p) for p in files], [str(u) for u in uids] if uids else None


# Patient and General Study attributes a SEG copies from its source. All are Type 2 (required, but may be empty,
# PS3.3 C.7.1.1 and C.7.2.1): anonymisers often remove them (PatientBirthDate, StudyTime), so a missing one is
# written empty, as the standard allows, instead of failing after the inference (issue 28). Only the in-memory
# copy changes; the source files are never touched.
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber")
# Type 1 attributes (never empty) a SEG needs from its source: without them no SEG can reference it
TYPE1_NEEDED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns")


def _fill_type2(ds: Any) -> None:
    for keyword in TYPE2_COPIED:
        if keyword not in ds:
            setattr(ds, keyword, "")


def require_seg_attributes(files: Sequence[str | Path], path: str | Path | None = None) -> None:
    """Refuse, before any inference, a source whose first file lacks a Type 1 attribute the SEG must copy."""
    import pydicom

    if not files:
        return
    try:
        ds = pydicom.dcmread(str(files[0]), stop_before_pixels=True, specific_tags=list(TYPE1_NEEDED))
    except Exception:  # unreadable: the reader refused it already, or the writer will say so
        return
    missing = [k for k in TYPE1_NEEDED if not str(getattr(ds, k, "") or "").strip()]
    if missing:
        prefix = f"{path}: " if path else ""
        raise ImageWriteError(f"{prefix}DICOM SEG needs {', '.join(missing)} from the source ({files[0]}), which "
                              "does not have it; save as .nii.gz instead")


def _read_sources(files: list[Path], uids: list[str] | None) -> list[Any]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    datasets = []
    for i, path in enumerate(files):
        if not path.is_file():
            raise ImageWriteError(
                f"source DICOM file {path} is gone; DICOM SEG must reference the images the labels were made on: "
                f"put the series back or save as .nii.gz"
            )
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)  # highdicom needs the headers only
        except (InvalidDicomError, EOFError, OSError, ValueError, KeyError) as err:
            raise ImageWriteError(f"source DICOM file {path} is not readable ({err})") from err
        _fill_type2(ds)
        if uids is not None and str(getattr(ds, "SOPInstanceUID", "")) != uids[i]:
            raise ImageWriteError(
                f"source DICOM file {path} changed since the image was read (its SOPInstanceUID differs); reopen "
                f"the series and segment it again"
            )
        datasets.append(ds)
    return datasets


def _frames(labels: np.ndarray, datasets: list[Any]) -> np.ndarray:
    """Labels as (frames, rows, cols), checked against the source images."""
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    if len(datasets) == 1:
        n = int(getattr(datasets[0], "NumberOfFrames", 1) or 1)
        expected: tuple[int, ...] = (rows, cols) if n == 1 else (n, rows, cols)
    else:
        expected = (len(datasets), rows, cols)
    allowed = {expected, (1, rows, cols)} if len(expected) == 2 else {expected}  # a 2D image may come as 1 slice
    if tuple(labels.shape) not in allowed:
        raise ImageWriteError(
            f"labels have shape {labels.shape} but the DICOM source has {expected} (slices, rows, columns); "
            f"write labels made on that series"
        )
    return labels.reshape((-1, rows, cols))


def _descriptions(n_segments: int, class_names: Sequence[str], algorithm: SegAlgorithm) -> list[Any]:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    params = {k: _lo(v) for k, v in (("model", algorithm.model), ("attribute", algorithm.attribute)) if v}
    if algorithm.forced:  # AlgorithmParameters is LT (10240 characters) of "key=value" joined by ","
        params["forced"] = "yes"
        params["fit_findings"] = " | ".join(f.replace(",", ";").replace("=", ":") for f in algorithm.findings)[:4000]
    kind = getattr(hd.seg.SegmentAlgorithmTypeValues, algorithm.kind.upper())
    ident = None if algorithm.kind == "manual" else hd.AlgorithmIdentificationSequence(  # none for MANUAL
        name=_lo(algorithm.name), version=_lo(algorithm.version), family=codes.cid7162.ArtificialIntelligence,
        parameters=params or None)
    out = []
    for k in range(1, n_segments + 1):
        name = str(class_names[k]) if k < len(class_names) and str(class_names[k]).strip() else f"label {k}"
        # the class is not coded in a terminology we know, so the property is the generic "Tissue" and the
        # segment label carries the model's class name
        out.append(hd.seg.SegmentDescription(
            segment_number=k, segment_label=_lo(name), segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue, algorithm_type=kind, algorithm_identification=ident,
        ))
    return out


def _series_description(algorithm: SegAlgorithm) -> str:
    edited = {"semiautomatic": "edited", "manual": "manual"}.get(algorithm.kind, "")
    # FORCED before the names: the description is cut at 64 characters
    parts = ["dMoE SEG", "FORCED" if algorithm.forced else "", Path(algorithm.model).stem if algorithm.model else "",
             algorithm.attribute, edited]
    return _lo(" ".join(p for p in parts if p))


def write_dicom_seg(path: str | Path, labels: np.ndarray, source: Volume | Sequence[str | Path],
                    class_names: Sequence[str] = (), algorithm: SegAlgorithm | None = None) -> Path:
    """Write `labels` ((z, y, x) in our sorted slice order, or (y, x) for a single 2D image) as a DICOM SEG.

    `source` is the Volume the labels were made on (its meta lists the sorted source files) or the source
    files in label-plane order. `class_names[k]` names label k (class 0 is background); labels without a
    name become "label k". Written atomically; returns the path.
    """
    from napari_dmoe.io.files import atomic_write

    path = Path(path)
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iub" or (labels.size and labels.min() < 0):
        raise ImageWriteError("DICOM SEG labels must be non-negative integers")
    if not path.parent.is_dir():
        raise ImageWriteError(f"{path.parent}: folder does not exist")
    files, uids = source_files(source)
    if uids is not None and len(uids) != len(files):
        uids = None  # metadata edited by hand: fall back to trusting the file list
    top = int(labels.max()) if labels.size else 0
    n_segments = max(len(class_names) - 1, top)
    if n_segments < 1:
        raise ImageWriteError("DICOM SEG needs at least one foreground class; the labels and class names have none")
    if n_segments > 65535:
        raise ImageWriteError(f"label value {top} is too large for DICOM SEG; relabel to fewer classes")
    datasets = _read_sources(files, uids)
    frames = _frames(labels, datasets).astype(np.uint8 if n_segments < 256 else np.uint16)
    algorithm = algorithm or SegAlgorithm()
    seg = _build(frames, datasets, _descriptions(n_segments, class_names, algorithm), algorithm, empty=top == 0)
    atomic_write(path, lambda tmp: seg.save_as(str(tmp)))
    return path


def _build(frames: np.ndarray, datasets: list[Any], descriptions: list[Any], algorithm: SegAlgorithm,
           empty: bool) -> Any:
    import highdicom as hd

    try:
        return hd.seg.Segmentation(
            source_images=datasets, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=901,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="napari-dmoe",
            manufacturer_model_name=_lo(algorithm.model or algorithm.name), software_versions=_lo(algorithm.version),
            device_serial_number="none", series_description=_series_description(algorithm),
            content_description=_lo(_content(algorithm)),
            content_label="DMOE_SEG",
            # an all-background mask still gets its frames: a SEG without any frame is not a valid file
            omit_empty_frames=not empty,
        )
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as err:
        raise ImageWriteError(
            f"cannot build a DICOM SEG on the source series ({err}); save as .nii.gz instead"
        ) from err


def _content(algorithm: SegAlgorithm) -> str:
    if algorithm.kind == "manual":
        return "manual segmentation (napari)"
    forced = " FORCED: image unlike training data" if algorithm.forced else ""
    return f"{algorithm.kind} segmentation by {algorithm.name} {algorithm.version}{forced}"


# -- reading -----------------------------------------------------------------------------------------------------
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
_MAX_FOLDERS = 64  # folders searched for the source series next to a SEG


def is_dicom_seg(path: str | Path) -> bool:
    """True for a DICOM Segmentation file (cheap: the header only)."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:  # not DICOM, unreadable: not a SEG either
        return False
    return str(getattr(ds, "SOPClassUID", "")) == SEG_SOP_CLASS


def find_source_series(seg_path: Path, series_uid: str) -> list[Path]:
    """The files of series ``series_uid`` in the SEG's folder, its sibling folders or its subfolders."""
    import pydicom

    folder = seg_path.parent
    candidates = [folder, *sorted(p for p in folder.parent.iterdir() if p.is_dir() and p != folder),
                  *sorted(p for p in folder.iterdir() if p.is_dir())][:_MAX_FOLDERS]
    for candidate in candidates:
        files = []
        for path in sorted(p for p in candidate.iterdir() if p.is_file() and p != seg_path):
            try:
                ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
            except Exception:  # READMEs, thumbnails: not ours to judge
                continue
            if str(getattr(ds, "SeriesInstanceUID", "")) == series_uid:
                files.append(path)
        if files:
            return files
    return []


def read_dicom_seg(path: str | Path, source: Volume | None = None) -> Volume:
    """A DICOM SEG as a label Volume (label k = segment k) on the grid of its source series.

    ``source``: the Volume of the series it was made on; None looks for that series beside the file (its folder,
    sibling and sub-folders). Without it the SEG is read on its own frames' grid, which skips the slices it
    has no segment on (a warning says so). ``meta["class_names"]`` has "background" and the segment labels."""
    import highdicom as hd

    from napari_dmoe.io.dicom import read_dicom_series
    from napari_dmoe.io.volume import ImageReadError

    path = Path(path)
    try:
        seg = hd.seg.segread(str(path))
    except Exception as err:  # pydicom / highdicom raise many types for a file that is not a valid SEG
        raise ImageReadError(f"{path}: not a readable DICOM SEG ({err})") from err
    numbers = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    class_names = ["background"] + [numbers.get(k, f"label {k}") for k in range(1, max(numbers, default=0) + 1)]
    warnings: list[str] = []
    if source is None:
        refs = getattr(seg, "ReferencedSeriesSequence", None) or []
        files = find_source_series(path, str(refs[0].SeriesInstanceUID)) if refs else []
        source = read_dicom_series(files) if files else None
    meta = {"source": str(path), "format": "dicom-seg", "modality": "SEG", "spacing_known": True,
            "class_names": class_names, "warnings": warnings}
    if source is not None and source.meta.get("sop_instance_uids"):
        uids = list(source.meta["sop_instance_uids"])
        labels = seg.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True)
        labels = labels.reshape(source.spatial_shape)
        meta.update(source_series=str(source.meta.get("source", "")), files=source.meta.get("files"),
                    sop_instance_uids=uids, format="dicom")  # written back as a SEG on the same series
        return Volume(array=labels, spacing=source.spacing, origin=source.origin, affine=source.affine, meta=meta)
    warnings.append("the source series was not found next to the SEG: read on the SEG's own frames, which leave out "
                    "slices without a segment; open the SEG beside its series for the exact grid")
    volume = seg.get_volume(combine_segments=True, skip_overlap_checks=True)
    lps, array = np.array(volume.affine, dtype=float), np.asarray(volume.array)  # (slice, row, column) -> LPS
    if lps[:3, 0] @ np.cross(lps[:3, 2], lps[:3, 1]) < 0:  # slices in our order: along +normal (row x column)
        array, lps[:3, 3] = array[::-1], lps[:3, 3] + lps[:3, 0] * (array.shape[0] - 1)
        lps[:3, 0] *= -1
    zyx_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    spacing = tuple(float(s) for s in np.linalg.norm(lps[:3, :3], axis=0))
    units = lps[:3, :3] / np.asarray(spacing)
    origin = tuple(float(lps[:3, 3] @ units[:, a]) for a in range(3))  # projected like read_dicom_series
    return Volume(array=np.ascontiguousarray(array), spacing=spacing, origin=origin, affine=zyx_to_ras, meta=meta)
