"""A dock body that scrolls up and down only (the Segment and Fine-tune widgets share it)."""
from __future__ import annotations

from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QScrollArea, QVBoxLayout, QWidget


class _VerticalScroll(QScrollArea):
    """Scrolls up and down only: as wide as its contents need (napari sizes a dock by these hints), so nothing is
    cut off at the right, and as short as a few rows, so a tall dock never squeezes the canvas."""

    def eventFilter(self, watched: Any, event: Any) -> bool:  # noqa: N802 (Qt name)
        from qtpy.QtCore import QEvent

        if watched is self.widget() and event.type() == QEvent.Type.LayoutRequest:
            self.updateGeometry()  # the contents' needs changed (a banner shown, rows added): tell the dock
        return super().eventFilter(watched, event)

    def _hint(self, size: Any) -> Any:
        from qtpy.QtWidgets import QStyle

        bar = max(self.verticalScrollBar().sizeHint().width(),
                  self.style().pixelMetric(QStyle.PixelMetric.PM_ScrollBarExtent))
        size.setWidth(size.width() + bar + 2 * self.frameWidth())
        size.setHeight(min(size.height(), 240))
        return size

    def minimumSizeHint(self) -> Any:  # noqa: N802 (Qt name)
        body = self.widget()
        return self._hint(body.minimumSizeHint()) if body is not None else super().minimumSizeHint()

    def sizeHint(self) -> Any:  # noqa: N802 (Qt name)
        body = self.widget()
        if body is None:
            return super().sizeHint()
        size = self._hint(body.sizeHint())
        size.setHeight(body.sizeHint().height())
        return size


def scroll_body(owner: QWidget) -> QVBoxLayout:
    """Fill ``owner`` with a vertical scroll area and return the layout of its contents: a dock taller than the
    screen scrolls instead of being cut off or squeezing napari's canvas."""
    area = _VerticalScroll(owner)
    area.setWidgetResizable(True)
    area.setFrameShape(QScrollArea.Shape.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)  # wrap to the dock's width instead
    body = QWidget()
    area.setWidget(body)
    body.installEventFilter(area)
    outer = QVBoxLayout(owner)
    outer.setContentsMargins(0, 0, 0, 0)
    outer.addWidget(area)
    owner.scroll_area = area  # tests and screenshots scroll it
    return QVBoxLayout(body)
