"""Case tables: the CSV that lists a batch of images and each one's patient attributes.

Read by ``dmoe segment --csv`` and by the Routing inspector's folder run (``inference.sweep``): one ``image``
column (a file or folder name, relative to the images folder) and one column per model attribute.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


def read_batch_csv(path: Path, spec: Any) -> list[tuple[str, Any]]:
    """Rows of (image file name, attribute) from a CSV with an 'image' column and one column per attribute."""
    if not path.is_file():
        raise FileNotFoundError(f"CSV {path} does not exist")
    try:
        return _read_rows(path, spec)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text CSV ({err.reason} at byte {err.start}); save it as CSV "
                         "UTF-8") from None
    except csv.Error as err:
        raise ValueError(f"{path}: not a readable CSV ({err})") from None


def _read_rows(path: Path, spec: Any) -> list[tuple[str, Any]]:
    with path.open(newline="", encoding="utf-8-sig") as f:  # utf-8-sig: Excel writes a BOM
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if "image" not in columns:
            raise ValueError(f"{path}: needs a column 'image'; it has {columns}")
        names = [a.name for a in spec.attributes]
        missing = [n for n in names if n not in columns]
        if missing:
            raise ValueError(f"{path}: no column for attribute(s) {missing} (columns: {columns})")
        rows = []
        for line, row in enumerate(reader, start=2):
            # an empty cell is an unknown value; the engine averages over the routers that fit the known ones
            values = {n: (row.get(n) or "").strip() or "unknown" for n in names}
            known = {n: v for n, v in values.items() if v.lower() != "unknown"}
            for attr in spec.attributes:  # fail early, naming the vocabulary, before hours of inference
                if attr.name in known and known[attr.name] not in attr.values:
                    raise ValueError(f"{path}, line {line}: {attr.name}={known[attr.name]!r} is not in the model's "
                                     f"vocabulary {attr.values}; leave the cell empty or write 'unknown'")
            image = (row.get("image") or "").strip()
            if not image:  # a short row or an empty cell: no image to segment (not a KeyError later)
                raise ValueError(f"{path}, line {line}: the 'image' cell is empty; give the image's file name or "
                                 "remove the row")
            rows.append((image, values if known else None))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


# A cell that starts with one of these is a formula to Excel, LibreOffice and Google Sheets (=1+2, @SUM(...),
# +cmd|...). OWASP's CSV-injection advice: prefix such a cell with a single quote, which the spreadsheet shows as text.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_text(value: object) -> str:
    """A text cell (an image name, a group) as a spreadsheet shows it, never run as a formula (OWASP). Numbers we
    format ourselves are written as they are; this is for text that came from the user's files."""
    text = str(value)
    return "'" + text if text.startswith(FORMULA_STARTS) else text
