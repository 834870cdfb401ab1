"""The Segment dock's fit check: what its banner says about the selected image under the chosen model.

The quick part (2D/3D, channels, modality, voxel size, intensities: the model file's header, ``inference.fit``) runs
at once in the GUI thread. The model's own view (``inference.ood``: how far the image's features lie from the training
images', with the threshold) needs the network, so it runs in a napari thread worker and the banner grows when it is
done. It scores on a model loaded for this check alone, one image at a time: scoring hooks the network's layers, so
it never shares a network with a running segmentation.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

from qtpy.QtCore import QObject, Signal

from napari_dmoe.io.model_cache import ModelCache
from napari_dmoe.plugin.results import layer_image

log = logging.getLogger(__name__)


def feature_findings(cache: ModelCache, lock: Any, path: str, data: Any, spacing: Any, rgb: bool) -> list[Any]:
    """Worker: the features finding of ``inference.ood`` for one image (empty when it looks like training data)."""
    from napari_dmoe.inference.ood import feature_findings as findings
    from napari_dmoe.inference.request import as_array

    try:
        with lock:
            return findings(cache.get(path), as_array(data), spacing, rgb)
    except Exception:  # the banner is advice; the engine checks again (and refuses) when it runs
        log.exception("feature fit check failed")
        return []


class FitCheck(QObject):
    """Fills ``banner`` (a ``panels.FitBanner``) for an image and a model; ``changed`` when the slow part adds to it."""

    changed = Signal()

    def __init__(self, banner: Any, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.banner = banner
        self._cache = ModelCache(size=1)
        self._lock = threading.Lock()
        self._token: object | None = None
        self.worker: Any = None  # the running feature check (tests wait for it)

    def check(self, spec: Any, model_path: str, layer: Any, name: str, local: bool = True) -> None:
        """Show the quick findings now; start the feature check when the model has a record of its features and
        runs here (``local``; a server checks its own)."""
        self._token = token = object()
        quick: list[Any] = []
        if layer is not None and spec is not None:
            from napari_dmoe.inference.fit import check_fit

            data, spacing, rgb, modality = layer_image(layer)
            try:
                quick = check_fit(spec, data, spacing, rgb=rgb, modality=modality)
            except Exception:  # an odd layer must not break the widget; the engine's own checks still run
                log.exception("fit check failed")
            if local and model_path and (spec.trained_on or {}).get("features") is not None:
                self._start(token, quick, name, model_path, data, spacing, rgb)
        self.banner.show_findings(quick, name)

    def _start(self, token: object, quick: list[Any], name: str, *args: Any) -> None:
        from napari.qt.threading import create_worker

        worker = create_worker(feature_findings, self._cache, self._lock, *args, _start_thread=False)
        worker.returned.connect(lambda found: self._done(token, quick, found, name))
        worker.finished.connect(lambda: setattr(self, "worker", None) if self.worker is worker else None)
        self.worker = worker
        worker.start()

    def _done(self, token: object, quick: list[Any], found: list[Any], name: str) -> None:
        if token is self._token and found:  # still the image and model shown
            self.banner.show_findings([*quick, *found], name)
            self.changed.emit()

    def show(self, findings: list[Any], name: str) -> None:
        """Findings the engine refused a run with (it checks again when it runs): shown, so "Segment anyway"
        is offered."""
        self._token = None
        self.banner.show_findings(findings, name)
        self.changed.emit()
