"""Longest event-loop stall on the GUI thread, for ``bench_finetune_stall.py`` and the fine-tune widget test.

A measuring tool, not part of the plugin (so it lives here, beside the benchmark that reports it).
"""
from __future__ import annotations

import time


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
