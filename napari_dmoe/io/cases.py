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
            values = {n: (row[n] or "").strip() or "unknown" for n in names}
            known = {n: v for n, v in values.items() if v.lower() != "unknown"}
            for attr in spec.attributes:  # fail early, naming the vocabulary, before hours of inference
                if attr.name in known and known[attr.name] not in attr.values:
                    raise ValueError(f"{path}, line {line}: {attr.name}={known[attr.name]!r} is not in the model's "
                                     f"vocabulary {attr.values}; leave the cell empty or write 'unknown'")
            rows.append((row["image"].strip(), values if known else None))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows
