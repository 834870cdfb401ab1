"""Patient attribute values an image carries, and where each came from.

Sources, in order: our sample data (``metadata["dmoe_attributes"]``, "from sample") and DICOM headers
(``metadata["patient"]``: PatientAge, PatientSex as the DICOM reader stores them, "from DICOM header"). A header
value is mapped onto the model's vocabulary (age in years -> the age group that holds it; M/F -> the value
starting with that letter) and left out when it does not map, so an unknown stays unknown rather than guessed.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

FROM_SAMPLE, FROM_DICOM, FROM_USER, NOT_KNOWN = "from sample", "from DICOM header", "set by you", "not known"
_AGE_UNITS = {"Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}
_SEX_NAMES = ("sex", "gender")


def dicom_age_years(text: Any) -> float | None:
    """DICOM Age String ("045Y", "006M", "010W", "003D") -> years; None when missing or malformed."""
    match = re.fullmatch(r"\s*(\d{1,3})\s*([YMWD])\s*", str(text or "").upper())
    return int(match.group(1)) * _AGE_UNITS[match.group(2)] if match else None


def age_group(years: float, values: list[str]) -> str | None:
    """The vocabulary value ("0-19", "60-79", "80+") whose range holds ``years``; None when none does."""
    for value in values:
        bounded = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", value)
        if bounded and int(bounded.group(1)) <= years < int(bounded.group(2)) + 1:
            return value
        open_ended = re.fullmatch(r"\s*(\d+)\s*\+\s*", value)
        if open_ended and years >= int(open_ended.group(1)):
            return value
    return None


def _sex_value(code: Any, values: list[str]) -> str | None:
    code = str(code or "").strip().upper()[:1]
    if code not in ("M", "F"):
        return None
    hits = [v for v in values if v.strip().upper().startswith(code)]
    return hits[0] if len(hits) == 1 else None


def image_attributes(spec: Any, metadata: Mapping[str, Any] | None) -> dict[str, tuple[str, str]]:
    """name -> (value, source) for the model's attributes the image's metadata gives a vocabulary value for."""
    meta = metadata or {}
    out: dict[str, tuple[str, str]] = {}
    sample = meta.get("dmoe_attributes")
    patient = meta.get("patient") if isinstance(meta.get("patient"), Mapping) else {}
    for attr in spec.attributes:
        if isinstance(sample, Mapping) and str(sample.get(attr.name)) in attr.values:
            out[attr.name] = (str(sample[attr.name]), FROM_SAMPLE)
            continue
        value = None
        if attr.name == "age" or all(re.search(r"\d", v) for v in attr.values):
            years = dicom_age_years(patient.get("age"))
            value = age_group(years, attr.values) if years is not None else None
        if attr.name.lower() in _SEX_NAMES:
            value = _sex_value(patient.get("sex"), attr.values)
        if value is not None:
            out[attr.name] = (value, FROM_DICOM)
    return out
