"""Watching a fine-tune from the GUI thread: live training curves (``CurvePlot``). torch is never imported.

(The event-loop stall meter that checks a running fine-tune never freezes napari is a measuring tool, not part of
the plugin: ``bench/stall_meter.py``.)
"""
from __future__ import annotations

import math
import time
from typing import Any, Sequence

from qtpy.QtWidgets import QWidget


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

        self.figure = Figure(figsize=(4.4, 2.6), dpi=80)
        # room for the titles above and the step ticks below (they were clipped at 2.2 in)
        self.figure.subplots_adjust(left=0.11, right=0.98, bottom=0.16, top=0.86, wspace=0.35)
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
            pixmap = QPixmap.fromImage(image)  # fromImage copies: the buffer may go
            if self.image.width() > 0:  # fill the dock's width: smaller in a narrow dock, larger in a wide one
                from qtpy.QtCore import Qt

                pixmap = pixmap.scaledToWidth(min(self.image.width(), int(1.3 * width)),
                                              Qt.TransformationMode.SmoothTransformation)
            self.image.setFixedHeight(pixmap.height())  # the whole plot: titles and tick labels never cut off
            self.image.setPixmap(pixmap)
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
