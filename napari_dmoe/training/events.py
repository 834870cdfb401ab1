"""Progress of a training run: JSON lines for programs (``--events FILE|-``) and a tqdm bar for people.

Every event is one JSON object on its own line, flushed at once (the GUI fine-tune widget tails it from a
subprocess): ``{"event": "start"|"step"|"val"|"checkpoint"|"done"|"error", "time": unix seconds, ...}``;
cross-validation (``crossval.py``) adds "crossval" (progress: done, total) and "selection" (its record).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, TextIO

EVENTS = ("start", "step", "val", "checkpoint", "done", "error", "crossval", "selection")  # the last two: crossval.py


def _clean(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, tuples -> lists, Paths -> str."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Path):
        return str(x)
    return x


class EventWriter:
    """Writes events to a file, to stdout (``"-"``) or nowhere (``None``, e.g. on ranks other than 0)."""

    def __init__(self, target: str | Path | None) -> None:
        self._own = False
        self._stream: TextIO | None = None
        # also told every event (rank 0): the run folder's history and plain progress lines (training.history)
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []
        if target is None:
            return
        if str(target) == "-":
            self._stream = sys.stdout
        else:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            self._stream = open(target, "a", encoding="utf-8")  # append: a resumed run continues the file
            self._own = True

    def emit(self, event: str, **fields: Any) -> None:
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}; expected one of {EVENTS}")
        if self._stream is None and not self.listeners:
            return
        record = {"event": event, "time": round(time.time(), 3), **_clean(fields)}
        for listener in self.listeners:
            listener(event, record)
        if self._stream is None:
            return
        self._stream.write(json.dumps(record, allow_nan=False) + "\n")
        self._stream.flush()

    def close(self) -> None:
        if self._own and self._stream is not None:
            self._stream.close()
        self._stream = None


class ProgressBar:
    """tqdm on stderr; off when ``quiet``, when stderr is not a terminal, or on ranks other than 0."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, file=sys.stderr, unit="step", dynamic_ncols=True)

    def update(self, **postfix: Any) -> None:
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()},
                                  refresh=False)
            self._bar.update(1)

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
