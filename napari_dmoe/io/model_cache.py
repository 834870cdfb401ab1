"""Loaded models kept for the next request: the Segment and Inspector widgets (one cache each: state belongs to a
viewer) and a server answering many requests (one cache per server object), never a module-level singleton.

A model is reused while its file is unchanged: the key is the resolved path with the file's modification time and
size, so a fine-tune writing a new checkpoint under the same name is loaded again. Loading a model costs the
network build and the weights read, a large part of a first mask; a cached one costs nothing.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any


def file_key(path: str | os.PathLike) -> tuple[str, int, int]:
    """(resolved path, mtime in ns, size): what identifies one version of a model file."""
    resolved = Path(path).resolve()
    st = os.stat(resolved)
    return str(resolved), st.st_mtime_ns, st.st_size


class ModelCache:
    """Up to ``size`` loaded models (least recently used dropped first), reloaded when the file changes on disk.
    Thread-safe: a widget's worker thread or a server's request threads may call ``get`` at once."""

    def __init__(self, size: int = 1, device: str = "cpu") -> None:
        self.size, self.device = max(1, int(size)), device
        self._models: OrderedDict[tuple[str, int, int], Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str | os.PathLike) -> Any:
        """The model in ``path``, loaded once per file version; raises ``CheckpointError`` for a missing or bad
        file, as ``load_model`` does."""
        from napari_dmoe.io.checkpoint import load_model

        if not os.path.exists(path):
            return load_model(path)  # its own message for a missing file
        key = file_key(path)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            for old in [k for k in self._models if k[0] == key[0]]:  # an older version of the same file
                del self._models[old]
            model = load_model(path, device=self.device)
            self._models[key] = model
            while len(self._models) > self.size:
                self._models.popitem(last=False)
            return model

    def clear(self) -> None:
        with self._lock:
            self._models.clear()
