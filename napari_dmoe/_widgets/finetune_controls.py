"""Qt building blocks of the fine-tune widget: the pairs table, the settings form, live curves, before/after.

Each block exposes plain values; ``finetune_widget.py`` wires them. torch is never imported here.
"""
from __future__ import annotations

import math
import time
from typing import Any, Sequence

from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QLineEdit,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from napari_dmoe.finetune import FinetuneError, FinetuneSettings

TRAINABLE = {"all weights": "all", "only routers and experts": "routers_experts"}


class PairTable(QTableWidget):
    """Rows of (image layer, labels layer, one value per attribute, validation flag)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(0, 3, parent)
        self.attributes: list[Any] = []  # spec.attributes of the base model
        self.image_names: list[str] = []
        self.labels_names: list[str] = []
        self.setSelectionBehavior(QAbstractItemView.SelectRows)
        self._set_headers()

    def _set_headers(self) -> None:
        names = ["image", "labels", *[a.name for a in self.attributes], "validation"]
        self.setColumnCount(len(names))
        self.setHorizontalHeaderLabels(names)

    def set_attributes(self, attributes: Sequence[Any]) -> None:
        """New vocabulary (another base model): keep the layer choices, reset attribute cells."""
        rows = [(self.cellWidget(r, 0).currentText(), self.cellWidget(r, 1).currentText(),
                 self.validation_flag(r)) for r in range(self.rowCount())]
        old = [self.row_attributes(r) for r in range(self.rowCount())]
        self.attributes = list(attributes)
        self.setRowCount(0)
        self._set_headers()
        for (image, labels, val), attrs in zip(rows, old):
            self.add_row(image, labels, attrs, val)

    def set_layer_names(self, images: Sequence[str], labels: Sequence[str]) -> None:
        self.image_names, self.labels_names = list(images), list(labels)
        for r in range(self.rowCount()):
            for col, names in ((0, self.image_names), (1, self.labels_names)):
                combo: QComboBox = self.cellWidget(r, col)
                current = combo.currentText()
                combo.blockSignals(True)
                combo.clear()
                combo.addItems(names)
                combo.setCurrentIndex(max(combo.findText(current), 0))
                combo.blockSignals(False)

    def add_row(self, image: str | None = None, labels: str | None = None,
                attributes: dict[str, str] | None = None, validation: bool = False) -> int:
        row = self.rowCount()
        self.insertRow(row)
        for col, (names, value) in enumerate(((self.image_names, image), (self.labels_names, labels))):
            combo = QComboBox()
            combo.addItems(names)
            if value is not None:
                combo.setCurrentIndex(max(combo.findText(value), 0))
            self.setCellWidget(row, col, combo)
        for i, attr in enumerate(self.attributes):
            combo = QComboBox()
            combo.addItems(list(attr.values))
            value = (attributes or {}).get(attr.name)
            if value in attr.values:
                combo.setCurrentIndex(attr.values.index(value))
            self.setCellWidget(row, 2 + i, combo)
        check = QCheckBox()
        check.setChecked(validation)
        check.setToolTip("Hold this pair back for validation (when none is ticked, 20 % are chosen at random)")
        self.setCellWidget(row, 2 + len(self.attributes), check)
        return row

    def remove_selected(self) -> None:
        for row in sorted({i.row() for i in self.selectedIndexes()}, reverse=True):
            self.removeRow(row)

    def row_attributes(self, row: int) -> dict[str, str]:
        return {a.name: self.cellWidget(row, 2 + i).currentText() for i, a in enumerate(self.attributes)}

    def set_row_attribute(self, row: int, name: str, value: str) -> None:
        i = [a.name for a in self.attributes].index(name)
        combo: QComboBox = self.cellWidget(row, 2 + i)
        if combo.findText(value) < 0:
            raise FinetuneError(f"{name}={value!r} is not in the base model's vocabulary")
        combo.setCurrentIndex(combo.findText(value))

    def validation_flag(self, row: int) -> bool:
        return self.cellWidget(row, self.columnCount() - 1).isChecked()

    def set_validation(self, row: int, value: bool) -> None:
        self.cellWidget(row, self.columnCount() - 1).setChecked(value)

    def rows(self) -> list[tuple[str, str, dict[str, str], bool]]:
        """(image layer name, labels layer name, attributes, validation) per row."""
        return [(self.cellWidget(r, 0).currentText(), self.cellWidget(r, 1).currentText(), self.row_attributes(r),
                 self.validation_flag(r)) for r in range(self.rowCount())]


class SettingsForm(QWidget):
    """Steps, learning rate, batch, patch size, what to train, mixed precision, validation fraction."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.steps = QSpinBox()
        self.steps.setRange(1, 1_000_000)
        self.lr = QDoubleSpinBox()
        self.lr.setDecimals(5)
        self.lr.setRange(1e-5, 1.0)
        self.lr.setSingleStep(0.0005)
        self.batch = QSpinBox()
        self.batch.setRange(1, 256)
        self.patch = QLineEdit()
        self.patch.setToolTip("Training patch size (3D models); 2D models train at their input size")
        self.trainable = QComboBox()
        self.trainable.addItems(list(TRAINABLE))
        self.trainable.setToolTip("Routers and experts only: few weights change, so few cases suffice and the "
                                  "rest of the network keeps what it learned")
        self.amp = QCheckBox("mixed precision (CUDA only)")
        self.val_fraction = QDoubleSpinBox()
        self.val_fraction.setRange(0.05, 0.9)
        self.val_fraction.setSingleStep(0.05)
        self.val_fraction.setValue(0.2)
        self.val_fraction.setToolTip("Share of pairs held back for validation when no row is ticked (at least 1)")
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        form.addRow("steps", self.steps)
        form.addRow("learning rate", self.lr)
        form.addRow("batch", self.batch)
        form.addRow("patch size", self.patch)
        form.addRow("train", self.trainable)
        form.addRow(self.amp)
        form.addRow("validation share", self.val_fraction)
        self.apply(FinetuneSettings())

    def apply(self, settings: FinetuneSettings) -> None:
        self.steps.setValue(settings.steps)
        self.lr.setValue(settings.lr)
        self.batch.setValue(settings.batch_size)
        self.amp.setChecked(settings.amp)
        if settings.patch_size:
            self.patch.setText(",".join(str(s) for s in settings.patch_size))

    def set_spec(self, spec: Any | None) -> None:
        """Patch size follows the base model: fixed for 2D (the TransUNet's input size), editable for 3D."""
        if spec is None:
            return
        self.patch.setText(",".join(str(s) for s in spec.input_size))
        self.patch.setEnabled(spec.spatial_dims == 3)
        routed = spec.routing != "none"
        item = self.trainable.model().item(1)
        item.setEnabled(routed)
        if not routed:
            self.trainable.setCurrentIndex(0)

    def settings(self, device: str, spatial_dims: int) -> FinetuneSettings:
        text = self.patch.text().strip()
        try:
            patch = [int(v) for v in text.replace("x", ",").split(",") if v.strip()] if text else None
        except ValueError:
            patch = []
        if patch is not None and (len(patch) != spatial_dims or min(patch) < 1):
            raise FinetuneError(f"patch size {text!r}: give {spatial_dims} positive integers separated by commas")
        return FinetuneSettings(steps=self.steps.value(), lr=float(self.lr.value()), batch_size=self.batch.value(),
                                patch_size=patch, device=device, trainable=TRAINABLE[self.trainable.currentText()],
                                amp=self.amp.isChecked() and device.startswith(("cuda", "auto")))


class CurvePlot(QWidget):
    """Training loss and per-group validation Dice, redrawn at most once per ``interval`` seconds.

    A matplotlib Agg render of even this small figure takes 50-100 ms (text layout dominates), which would freeze
    napari at every redraw. So the figure is rendered in a background thread (the figure is only ever touched by
    that thread while it runs) and the GUI thread just shows the finished image, which takes about a millisecond.
    One long-lived thread, not one per render: matplotlib caches fonts per thread, and a fresh thread reloads them
    (renders then took 3x longer and held the GIL for up to 250 ms).
    """

    def __init__(self, parent: QWidget | None = None, interval: float = 1.0) -> None:
        super().__init__(parent)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from qtpy.QtCore import QTimer
        from qtpy.QtWidgets import QLabel, QVBoxLayout

        self.figure = Figure(figsize=(4, 2.2), dpi=80)
        self.figure.subplots_adjust(left=0.1, right=0.98, bottom=0.14, top=0.88, wspace=0.3)
        self.agg = FigureCanvasAgg(self.figure)
        self.loss_ax, self.dice_ax = self.figure.subplots(1, 2)
        self.image = QLabel()
        self.image.setMinimumHeight(160)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.image)
        self.interval = interval
        self._last = 0.0
        self._pending: tuple | None = None  # newest data not drawn yet
        import queue
        import threading

        self._jobs: queue.Queue = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._worker, daemon=True, name="dmoe-curve-render")
        self._thread.start()
        self._result: tuple[int, int, bytes, bool] | None = None
        self._lines: dict[str, Any] = {}
        self.draws = 0
        self._collect = QTimer(self)  # picks up a finished render; runs only while one is in flight
        self._collect.setInterval(30)
        self._collect.timeout.connect(self._show_result)
        self.clear()
        self.wait()

    def clear(self) -> None:
        """Empty axes (waits for a render in flight, which never takes long)."""
        self.wait()
        self._pending = None
        self._last = 0.0
        self._start_render(None)

    def update_curves(self, losses: Sequence[tuple[int, float]], val: dict[str, list[tuple[int, float]]],
                      force: bool = False) -> bool:
        """Schedule a redraw if ``interval`` has passed (or ``force``); returns whether one started."""
        self._pending = (tuple(losses), {g: tuple(p) for g, p in val.items()})  # copies: the thread reads them
        if self.busy() or (not force and time.monotonic() - self._last < self.interval):
            return False
        self._last = time.monotonic()
        data, self._pending = self._pending, None
        self._start_render(data)
        return True

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def busy(self) -> bool:
        return not self._idle.is_set()

    def wait(self, timeout: float = 10.0) -> None:
        """Block until the render in flight is shown (tests, closing)."""
        self._idle.wait(timeout)
        self._show_result()

    def _start_render(self, data: tuple | None) -> None:
        self._idle.clear()
        self._jobs.put(data)
        self._collect.start()

    def _worker(self) -> None:  # background thread: takes one render job at a time
        while True:
            data = self._jobs.get()
            try:
                self._render(data)
            except Exception:  # a plotting bug must not kill the thread (the next render may still work)
                import logging

                logging.getLogger(__name__).exception("curve render failed")
            finally:
                self._idle.set()

    def _render(self, data: tuple | None) -> None:  # background thread: matplotlib only, no Qt
        if data is None:
            for ax, title in ((self.loss_ax, "training loss"), (self.dice_ax, "validation Dice")):
                ax.clear()
                ax.set_title(title, fontsize=8)
                ax.tick_params(labelsize=7)
            self.dice_ax.set_ylim(0, 1)
            (loss_line,) = self.loss_ax.plot([], [], lw=1)
            self._lines = {"__loss__": loss_line}
        else:
            self._set_lines(*data)
        self.agg.draw()
        width, height = self.agg.get_width_height()
        self._result = (width, height, bytes(self.agg.buffer_rgba()), data is not None)

    def _set_lines(self, losses: Sequence[tuple[int, float]], val: dict[str, Sequence[tuple[int, float]]]) -> None:
        if losses:
            steps, values = zip(*losses)
            self._lines["__loss__"].set_data(steps, values)
            self.loss_ax.relim()
            self.loss_ax.autoscale_view()
        new_group = False
        for group, points in sorted(val.items()):
            points = [(s, d) for s, d in points if d is not None and not math.isnan(d)]
            if not points:
                continue
            if group not in self._lines:
                (self._lines[group],) = self.dice_ax.plot([], [], marker="o", ms=3, lw=1, label=group,
                                                          ls="--" if group == "all" else "-")
                new_group = True
            s, d = zip(*points)
            self._lines[group].set_data(s, d)
        if val:
            self.dice_ax.relim()
            self.dice_ax.autoscale_view(scaley=False)
        if new_group:
            self.dice_ax.legend(fontsize=6, loc="lower right")

    def _show_result(self) -> None:
        from qtpy.QtGui import QImage, QPixmap

        result, self._result = self._result, None
        if result is not None:
            width, height, buffer, with_data = result
            image = QImage(buffer, width, height, QImage.Format_RGBA8888)
            self.image.setPixmap(QPixmap.fromImage(image))  # fromImage copies: the buffer may go
            self.draws += int(with_data)  # curves drawn (not counting empty axes)
        if not self.busy():
            self._collect.stop()
            if self._pending is not None:  # data arrived during the render: draw it when the interval is up
                from qtpy.QtCore import QTimer

                wait_s = max(0.0, self.interval - (time.monotonic() - self._last))
                QTimer.singleShot(int(wait_s * 1000), self._flush)

    def _flush(self) -> None:
        if self._pending is not None and not self.busy():
            self.update_curves(*self._pending, force=True)


class CompareTable(QTableWidget):
    """Per-group validation Dice before and after the fine-tune, side by side."""

    COLUMNS = ("group", "before", "after", "change")

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(0, len(self.COLUMNS), parent)
        self.setHorizontalHeaderLabels(self.COLUMNS)
        self.setEditTriggers(QAbstractItemView.NoEditTriggers)

    def show_rows(self, rows: Sequence[tuple[str, float, float, float]]) -> None:
        self.setRowCount(0)
        for group, before, after, change in rows:
            r = self.rowCount()
            self.insertRow(r)
            texts = (group, f"{before:.3f}", f"{after:.3f}", f"{change:+.3f}")
            for c, text in enumerate(texts):
                self.setItem(r, c, QTableWidgetItem(text))

    def values(self) -> list[list[str]]:
        return [[self.item(r, c).text() for c in range(self.columnCount())] for r in range(self.rowCount())]


class StallMeter:
    """Longest gap between ticks of a 10 ms timer on the GUI thread: how long the event loop was blocked.

    Used by the tests and ``bench/bench_finetune_stall.py`` to check that a fine-tune never freezes napari.
    """

    def __init__(self, interval_ms: int = 10) -> None:
        from qtpy.QtCore import Qt, QTimer

        self.interval = interval_ms / 1000
        self.timer = QTimer()
        self.timer.setTimerType(Qt.PreciseTimer)
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self._tick)
        self.gaps: list[float] = []
        self._last: float | None = None

    def start(self) -> None:
        self._last = time.perf_counter()
        self.timer.start()

    def stop(self) -> None:
        self.timer.stop()

    def _tick(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.gaps.append(now - self._last)
        self._last = now

    @property
    def longest_stall_ms(self) -> float:
        """Longest gap beyond the timer interval, in ms (0 when the loop always ran on time)."""
        return max(0.0, (max(self.gaps) - self.interval) * 1000) if self.gaps else 0.0
