"""Parts of the Segment dock a clinician reads at a glance: the fit warning banner, the progress bar with its stage,
the expert legend and one-expert view, and the sweep table with what its Dice means."""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_dmoe.model.spec import attribute_text
from napari_dmoe.plugin.widgets.controls import UNKNOWN
from napari_dmoe.plugin.widgets.jobs import Step

BANNER_STYLE = "background: #8a1c1c; color: white; padding: 6px; border-radius: 4px; font-weight: bold;"
OVERLAY_END = "gate weight (0 to 1, colour bar)"
SWEEP_COLUMNS = ("A", "B", "Dice", "changed\npx", "changed\n% of mask")
SWEEP_NOTE = ("Dice here is the agreement between the masks made under two attribute values (1 = identical), "
              "not accuracy: there is no ground truth. Changed %: pixels whose label differs, out of those either "
              "mask calls foreground.")


class FitBanner(QLabel):
    """A red banner listing how the image differs from the model's training data; hidden when it fits."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWordWrap(True)
        self.setStyleSheet(BANNER_STYLE)
        self.findings: list[Any] = []
        self.setVisible(False)

    def show_findings(self, findings: Sequence[Any], model: str = "the model") -> None:
        self.findings = list(findings)
        lines = "".join(f"<li>{f.message}</li>" for f in self.findings)
        self.setText(f"&#9888; This image does not fit {model}; the result may be wrong:<ul style='margin:0'>"
                     f"{lines}</ul>")
        self.setVisible(bool(self.findings))


def describe_step(step: Step) -> str:
    """Engine stages in words: "loading model", "window batch 3/12", "routing maps and mask"."""
    prefix, _, stage = step.text.rpartition(": ")
    words = {"preprocess": "preparing the image", "postprocess": "routing maps and mask"}.get(stage, stage)
    if stage == "infer":
        words = f"window batch {step.done}/{step.total}"
    return f"{prefix}: {words}" if prefix else words


class RunProgress(QWidget):
    """Progress bar and stage inside the dock, with the wall time since Segment was pressed (model loading
    included)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.bar = QProgressBar()
        self.bar.setTextVisible(True)
        self.stage = QLabel()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.bar)
        layout.addWidget(self.stage)
        self.started = 0.0
        self.loading = 0.0  # seconds until the model was loaded (the first step after "loading model")
        self._loaded = False
        self.setVisible(False)

    def start(self) -> None:
        self.started = time.perf_counter()
        self.loading, self._loaded = 0.0, False
        self.bar.setRange(0, 0)  # busy until the first step says how many
        self.stage.setText("starting")
        self.setVisible(True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def step(self, step: Step) -> None:
        if not self._loaded and step.text != "loading model":
            self.loading, self._loaded = self.elapsed(), True
        self.bar.setRange(0, max(step.total, 0))
        self.bar.setValue(min(step.done, step.total))
        self.stage.setText(f"{describe_step(step)} ({self.elapsed():.0f} s)")

    def finish(self) -> None:
        self.setVisible(False)


class ExpertView(QWidget):
    """Legend of the dominant-expert map (expert -> colour) and a picker that shows one expert's heatmap."""

    def __init__(self, viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.show_combo = QComboBox()
        self.show_combo.setToolTip("Show the dominant expert map, or one expert's gate weight over the image")
        self.legend = QGridLayout()
        self.legend.setContentsMargins(0, 0, 0, 0)
        self.layers: dict[str, Any] = {}
        row = QHBoxLayout()
        row.addWidget(QLabel("show"))
        row.addWidget(self.show_combo, 1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addLayout(self.legend)
        self.show_combo.currentIndexChanged.connect(lambda _: self.apply())
        self.setVisible(False)

    def set_layers(self, layers: dict[str, Any]) -> None:
        """``layers``: kind -> layer of the newest run ("experts", "dominant")."""
        self.layers = layers
        heat, dominant = layers.get("experts"), layers.get("dominant")
        self.setVisible(heat is not None and dominant is not None)
        if heat is None or dominant is None:
            if self.viewer.text_overlay.text.endswith(OVERLAY_END):  # our caption of another image's heatmap
                self.viewer.text_overlay.visible = False
            return
        n = int(heat.data.shape[0])
        self.show_combo.blockSignals(True)
        self.show_combo.clear()
        self.show_combo.addItems(["mask only", "dominant expert", *(f"expert {e}" for e in range(n))])
        self.show_combo.blockSignals(False)
        while self.legend.count():
            item = self.legend.takeAt(0)
            if item.widget() is not None:
                item.widget().deleteLater()
        for e in range(n):
            r, g, b, _ = (int(255 * c) for c in dominant.get_color(e + 1))
            chip = QLabel(f"<span style='color: rgb({r},{g},{b}); font-size: 16px'>&#9632;</span> expert {e}")
            self.legend.addWidget(chip, e // 4, e % 4)

    def apply(self) -> None:
        """Make the chosen view visible: one expert's heatmap on its slider step, or the dominant-expert map."""
        heat, dominant = self.layers.get("experts"), self.layers.get("dominant")
        if heat is None or dominant is None or heat not in self.viewer.layers or dominant not in self.viewer.layers:
            return
        choice = self.show_combo.currentText()
        dominant.visible = choice == "dominant expert"
        heat.visible = choice.startswith("expert ")
        # the colorbar has no title of its own: say on the canvas what it measures
        self.viewer.text_overlay.text = f"{choice}: {OVERLAY_END}" if heat.visible else ""
        self.viewer.text_overlay.visible = heat.visible
        if heat.visible:
            heat.colorbar.visible = True
            axis = self.viewer.dims.ndim - heat.ndim  # the heatmap's leading (expert) axis in the viewer
            self.viewer.dims.set_current_step(axis, int(choice.split()[1]))
            self.viewer.layers.selection.active = heat

    def show_run(self, layers: list) -> None:
        """Take the heatmaps of a run just placed (its layer data tuples): colorbar on, legend and picker."""
        from napari_dmoe.plugin.results import RESULT_KEY

        found = {}
        for _, kwargs, _ in layers:
            name = kwargs["name"]
            layer = self.viewer.layers[name] if name in self.viewer.layers else None  # noqa: SIM401 (no .get)
            kind = layer.metadata.get(RESULT_KEY, {}).get("kind") if layer is not None else None
            if kind in ("experts", "dominant"):
                found[kind] = layer
        if "experts" in found:
            found["experts"].colorbar.visible = True
        self.set_layers(found)

    def show_expert(self, expert: int) -> None:
        self.show_combo.setCurrentText(f"expert {expert}")

    def show_dominant(self) -> None:
        self.show_combo.setCurrentText("dominant expert")


class SweepTable(QWidget):
    """Pairwise agreement of the sweep's masks, with a note saying it is not accuracy."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.note = QLabel(SWEEP_NOTE)
        self.note.setWordWrap(True)
        self.table = QTableWidget(0, len(SWEEP_COLUMNS))
        self.table.setHorizontalHeaderLabels(SWEEP_COLUMNS)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.setSortingEnabled(True)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.title = QLabel()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.title)
        layout.addWidget(self.table)
        layout.addWidget(self.note)

    def clear(self) -> None:
        self.table.setRowCount(0)
        self.title.setText("")

    def show_masks(self, masks: dict[str, Any], n_classes: int, title: str) -> None:
        """Pairwise agreement of ``masks`` (tag -> label map). The change is a share of the masks' foreground
        (either mask), not of the image: a Dice of 0.6 must not read as "0.6 % changed" on a small structure."""
        import numpy as np

        from napari_dmoe.inference.sweep import pairwise_agreement

        table = pairwise_agreement(masks, n_classes=n_classes)
        arrays = {tag: np.asarray(m) > 0 for tag, m in masks.items()}
        rows = []
        for a, b, dice, changed, _ in table.pairs():
            foreground = np.count_nonzero(arrays[a] | arrays[b])
            rows.append((a, b, dice, changed, 100.0 * changed / foreground if foreground else 0.0))
        self.fill(rows, title)

    def fill(self, pairs: Sequence[tuple], title: str) -> None:
        self.table.setSortingEnabled(False)
        self.table.setRowCount(0)
        for values in pairs:
            row = self.table.rowCount()
            self.table.insertRow(row)
            for col, value in enumerate(values):
                item = QTableWidgetItem()
                # numbers as numbers (not text) so that sorting a column sorts by value
                item.setData(Qt.DisplayRole, round(value, 3) if isinstance(value, float) else value)
                self.table.setItem(row, col, item)
        self.table.setSortingEnabled(True)
        self.table.resizeColumnsToContents()
        self.title.setText(title)


def run_summary(result: Any, warnings: list[str], wall: float, loading: float) -> str:
    """Wall time since Segment was pressed (model loading included), then what was used."""
    seg = next(iter(result.segmentations.values()))
    used = attribute_text(seg.attribute)
    n = len(result.segmentations)
    text = f"Done in {wall:.1f} s on {seg.device} (loading the model {loading:.1f} s)"
    text += f"; {n} values" if n > 1 else f"; attribute {used}"
    if UNKNOWN in used:
        text += " (outputs of all routers averaged)"
    return text + (f"; {len(warnings)} warning(s)" if warnings else "")
