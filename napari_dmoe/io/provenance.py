"""How a saved mask was made, inside the file or beside it: model, attribute, whether an image that does not fit the
model was segmented anyway ("forced") and what the fit check found, device, notes.

One compact JSON record, stored where each format has room for it: a NIfTI header extension (code 6, "comment")
plus a short ``descrip``, a ``dmoe_provenance`` field of the ``.seg.nrrd`` header, a ``<file>.json`` sidecar for
PNG and TIFF; DICOM SEG says it in its own attributes (``dicom_seg.SegAlgorithm``). ``read_provenance`` reads it back
from any of them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

KEY = "dmoe_provenance"  # the .seg.nrrd header field
NIFTI_ECODE = 6  # NIfTI "comment" extension: free text, which readers that do not know it skip
SIDECAR_SUFFIXES = (".png", ".tif", ".tiff")


def mask_record(model: str, attribute: Any, *, forced: bool = False, fit_findings: Any = (), device: str = "",
                warnings: Any = (), conversions: Any = (), settings: Mapping[str, Any] | None = None,
                source: str = "", edited: bool = False) -> dict[str, Any]:
    """The record saved with a mask (every front end: the napari writer, its folder run, ``dmoe segment``); the
    first eight fields are ``inference.request.Provenance``'s, so ``mask_record(**provenance.to_dict())`` works."""
    from napari_dmoe import __version__

    return {"software": f"napari-dmoe {__version__}", "model": Path(str(model or "")).name,
            "attribute": dict(attribute) if isinstance(attribute, Mapping) else str(attribute or ""),
            "forced": bool(forced), "fit_findings": [str(f) for f in fit_findings], "device": str(device or ""),
            "warnings": [str(w) for w in warnings], "conversions": [str(c) for c in conversions],
            "settings": dict(settings or {}), "source": str(source or ""), "edited": bool(edited)}


def to_json(provenance: Mapping[str, Any]) -> str:
    """One line of JSON (an NRRD header field holds one line)."""
    return json.dumps(dict(provenance), sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=True)


def summary(provenance: Mapping[str, Any], limit: int = 80) -> str:
    """"dMoE <model> <attribute>[ FORCED]" in at most ``limit`` characters (NIfTI ``descrip`` holds 80 bytes)."""
    attribute = provenance.get("attribute") or {}
    text = ",".join(f"{k}={v}" for k, v in attribute.items()) if isinstance(attribute, Mapping) else str(attribute)
    forced = " FORCED" if provenance.get("forced") else ""
    return f"dMoE {Path(str(provenance.get('model') or '')).stem} {text}"[:limit - len(forced)] + forced


def sidecar(path: str | Path) -> Path:
    """``mask.png`` -> ``mask.png.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def write_sidecar(path: str | Path, provenance: Mapping[str, Any]) -> Path:
    from napari_dmoe.io.files import atomic_write_text

    return atomic_write_text(sidecar(path), json.dumps(dict(provenance), indent=1, sort_keys=True, default=str))


def read_provenance(path: str | Path) -> dict[str, Any] | None:
    """The record saved with the mask at ``path`` (any format we write), or None when it has none."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".seg.nrrd"):
        return _nrrd_field(path, KEY)
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        for ext in nib.load(str(path)).header.extensions:
            if ext.get_code() == NIFTI_ECODE:
                try:
                    data = json.loads(ext.get_content())
                except ValueError:
                    continue
                if isinstance(data, dict) and "model" in data:
                    return data
        return None
    if name.endswith(".dcm"):
        return _seg_provenance(path)
    side = sidecar(path)
    return json.loads(side.read_text(encoding="utf-8")) if side.is_file() else None


def _nrrd_field(path: Path, key: str) -> dict[str, Any] | None:
    """The JSON of header field ``key:=...`` (NRRD: text lines up to the first empty line, then the data)."""
    with open(path, "rb") as f:
        for _ in range(10_000):  # a header is a few dozen lines
            line = f.readline()
            if line in (b"", b"\n", b"\r\n"):
                break
            name, sep, value = line.decode("latin-1").rstrip("\r\n").partition(":=")
            if sep and name == key:
                return json.loads(value)
    return None


def _seg_provenance(path: Path) -> dict[str, Any] | None:
    """What a DICOM SEG we wrote says of itself: its algorithm parameters (model, attribute, forced, findings)."""
    import pydicom

    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    for segment in getattr(ds, "SegmentSequence", []):
        for ident in getattr(segment, "SegmentationAlgorithmIdentificationSequence", []):
            text = str(getattr(ident, "AlgorithmParameters", "") or "")
            pairs = dict(p.split("=", 1) for p in text.split(",") if "=" in p)
            if pairs:
                return {"model": pairs.get("model", ""), "attribute": pairs.get("attribute", ""),
                        "forced": pairs.get("forced") == "yes",
                        "fit_findings": [f for f in pairs.get("fit_findings", "").split(" | ") if f]}
    return None
