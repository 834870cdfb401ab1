"""Medical image I/O (NIfTI, DICOM, PNG/JPG/TIFF) and training datasets in public formats.

Names load lazily: the napari reader imports `data.io` without pulling in torch through the datasets.
"""
from __future__ import annotations

from typing import Any

_LAZY = {
    "Volume": "io",
    "ImageReadError": "io",
    "ImageWriteError": "io",
    "read_image": "io",
    "write_labels": "io",
    "read_dicom_file": "dicom",
    "read_dicom_series": "dicom",
    "DatasetError": "base",
    "DatasetReport": "base",
    "check_dataset": "base",
    "age_bin": "base",
    "AGE_BINS": "base",
    "FairSegDataset": "datasets",
    "HAM10000Dataset": "datasets",
    "NiftiFolderDataset": "datasets",
    "GenericFolderDataset": "datasets",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
