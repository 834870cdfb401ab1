"""Routing inspector dock: the attribute x expert matrix of mean gate weights for one image, as a heatmap.

It reads the expert usage the segment widget stores in each mask layer's metadata, so it costs no inference:
segment an image under several attribute values (or press "Sweep all values") and the rows fill in.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtWidgets import QComboBox, QFormLayout, QLabel, QVBoxLayout, QWidget

from napari_dmoe._widgets.results import RESULT_KEY

if TYPE_CHECKING:
    import napari


def _mask_records(viewer: Any) -> list[dict[str, Any]]:
    out = []
    for layer in viewer.layers:
        meta = layer.metadata.get(RESULT_KEY)
        if isinstance(meta, dict) and meta.get("kind") == "mask" and meta.get("expert_usage"):
            out.append(meta)
    return out


def _group(meta: dict[str, Any]) -> str:
    model = str(meta.get("model", "")).replace("\\", "/").rsplit("/", 1)[-1]
    return f"{meta.get('source_layer')} | {model}"


def _row_order(meta: dict[str, Any]) -> tuple:
    """Rows in vocabulary order, "unknown" last."""
    vocab = meta.get("spec", {}).get("attributes", {})
    key = []
    for name, value in meta.get("attribute_request", {}).items():
        values = vocab.get(name, [])
        key.append(values.index(value) if value in values else len(values))
    return tuple(key)


class RoutingInspector(QWidget):
    """Dock widget: pick an image (and model) that has results; see mean gate weight per attribute and expert."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:
        super().__init__()
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.viewer = getattr(napari_viewer, "__wrapped__", napari_viewer)
        self.groups = QComboBox()
        self.positions = QComboBox()
        self.figure = Figure(figsize=(4, 3), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.hint = QLabel()
        self.hint.setWordWrap(True)
        form = QFormLayout()
        form.addRow("image | model", self.groups)
        form.addRow("routing position", self.positions)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.canvas, 1)
        layout.addWidget(self.hint)
        self.groups.currentIndexChanged.connect(self._on_group_changed)
        self.positions.currentIndexChanged.connect(lambda _: self.draw())
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self.refresh)
        self.refresh()

    def refresh(self, *_: Any) -> None:
        """Re-read the result layers (called when layers are added or removed)."""
        current = self.groups.currentText()
        groups = sorted({_group(m) for m in _mask_records(self.viewer)})
        self.groups.blockSignals(True)
        self.groups.clear()
        self.groups.addItems(groups)
        self.groups.setCurrentIndex(max(self.groups.findText(current), 0))
        self.groups.blockSignals(False)
        self._on_group_changed()

    def _records(self) -> list[dict[str, Any]]:
        group = self.groups.currentText()
        records = [m for m in _mask_records(self.viewer) if _group(m) == group]
        return sorted(records, key=_row_order)

    def _on_group_changed(self, *_: Any) -> None:
        positions: list[str] = []
        for meta in self._records():
            positions += [p for p in meta["expert_usage"] if p not in positions]
        positions.sort(key=lambda p: (p != "mean", len(p), p))  # "mean" first, then block0, block1, ... block10
        current = self.positions.currentText()
        self.positions.blockSignals(True)
        self.positions.clear()
        self.positions.addItems(positions)
        self.positions.setCurrentIndex(max(self.positions.findText(current), 0))
        self.positions.blockSignals(False)
        self.draw()

    def matrix(self) -> tuple[list[str], np.ndarray]:
        """Row labels (attribute tags) and the ``[rows, experts]`` mean gate weights shown."""
        from napari_dmoe.sweep import usage_matrix

        rows = {}
        for meta in self._records():  # one row per tag: the latest layer of a tag wins
            rows[meta.get("tag", "")] = meta["expert_usage"]
        return usage_matrix(list(rows.items()), self.positions.currentText() or "mean")

    def draw(self) -> None:
        self.figure.clear()
        labels, matrix = self.matrix()
        if not labels:
            self.hint.setText("No dMoE results yet: segment an image with the Segment widget "
                              "(the attribute sweep fills one row per attribute value).")
            self.canvas.draw_idle()
            return
        self.hint.setText("Mean gate weight of each expert over the image; each row sums to 1. "
                          "Rows that differ show the attribute changes which experts do the work.")
        ax = self.figure.add_subplot(1, 1, 1)
        im = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=max(float(matrix.max()), 1e-6), aspect="auto")
        ax.set_xticks(range(matrix.shape[1]), [str(e) for e in range(matrix.shape[1])])
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("expert")
        if matrix.size <= 80:  # numbers stay readable on small matrices
            for (i, j), v in np.ndenumerate(matrix):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.6 * matrix.max() else "black")
        self.figure.colorbar(im, ax=ax, fraction=0.05)
        self.canvas.draw_idle()
