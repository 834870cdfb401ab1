"""Per-case records of ``dmoe evaluate`` in ``OUT/cases/``, so a killed evaluation continues where it stopped.

Each finished case is one JSON file (written atomically: it exists whole or not at all) holding its metrics and
mean expert usage, the case id and the model file's version (path, mtime, size; and the zoom, when not 1). A
rerun takes a record only when both still match, so another model or another split's case at that index is
evaluated again. JSON keeps Python floats exactly (shortest repr), so a resumed report equals an uninterrupted one.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from napari_dmoe.evaluation.loop import Evaluation
from napari_dmoe.evaluation.metrics import PerImage
from napari_dmoe.io.files import atomic_write
from napari_dmoe.io.model_cache import file_key


class CaseStore:
    """The records of ``ds``'s cases evaluated with ``model``, one file per case index in ``folder``."""

    def __init__(self, folder: str | Path, model: Any, ds: Any, zoom: float = 1.0) -> None:
        self.folder = Path(folder)
        path = getattr(model, "path", None)
        self.model = list(file_key(path)) if path and Path(path).is_file() else None
        if self.model is not None and zoom != 1.0:  # a case segmented at another zoom is another result
            self.model.append(f"zoom={zoom!r}")
        self.ids = [str(rec.id) for rec in ds.records]

    def _path(self, index: int) -> Path:
        return self.folder / f"{index:06d}.json"

    def get(self, index: int) -> Evaluation | None:
        """The stored evaluation of case ``index``, or None when there is none for this model and case."""
        if self.model is None:
            return None
        try:
            data = json.loads(self._path(index).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if data.get("model") != self.model or data.get("id") != self.ids[index]:
            return None
        records = [PerImage(r["id"], r["group"], r["metrics"]) for r in data["records"]]
        usage = {g: [np.asarray(v, dtype=np.float64) for v in rows] for g, rows in data["usage"].items()}
        return Evaluation(records, usage)

    def put(self, index: int, evaluation: Evaluation) -> None:
        if self.model is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"model": self.model, "id": self.ids[index],
                           "records": [asdict(r) for r in evaluation.records],
                           "usage": {g: [np.asarray(v).tolist() for v in rows] for g, rows in evaluation.usage.items()}})
        atomic_write(self._path(index), lambda tmp: tmp.write_text(text, encoding="utf-8"))
