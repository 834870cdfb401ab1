"""The events a ``dmoe train`` child writes (JSON lines, one object a line) and what the widget shows of them.

``EventReader`` reads the file as it grows; ``RunState`` folds the events into steps, losses, per-group
validation Dice, checkpoints and an ETA. No Qt, no torch: the widget polls from a QTimer.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class EventReader:
    """Reads a JSON-lines file as it grows; keeps a partial last line until its newline arrives."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path, self._offset, self._partial = Path(path), 0, b""
        self.bad_lines: list[str] = []

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()  # b"" when the chunk ended with a newline
        events = []
        for line in lines:
            text = line.decode("utf-8", "replace").strip()
            if not text:
                continue
            try:
                event = json.loads(text)
            except ValueError:
                self.bad_lines.append(text)  # e.g. a library printing to the events file: shown, not fatal
                continue
            if isinstance(event, dict) and "event" in event:
                events.append(event)
        return events


def group_dice(event: dict[str, Any]) -> dict[str, float]:
    """Per-group Dice of a "val" event: ``{"groups": {g: {"dice": x} | x}}`` or ``{"dice": {g: x}}``."""
    groups = event.get("groups") or event.get("dice") or event.get("group_dice") or {}
    out = {}
    if isinstance(groups, dict):
        for g, v in groups.items():
            value = v.get("dice", v.get("mean_dice")) if isinstance(v, dict) else v
            if isinstance(value, (int, float)):
                out[str(g)] = float(value)
    for key in ("dice", "mean_dice", "val_dice"):
        if isinstance(event.get(key), (int, float)):
            out["all"] = float(event[key])
    return out


@dataclass
class RunState:
    """Everything the widget shows, updated from the events."""

    total_steps: int = 0
    step: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    val: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # group -> [(step, dice)]
    checkpoints: list[str] = field(default_factory=list)
    best: str | None = None
    best_step: int | None = None  # 0: no step beat the starting weights on the validation cases
    done: bool = False
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    first_step_at: tuple[float, int] | None = None
    engine_eta: float | None = None  # the engine's own estimate (smoothed step time), preferred when given
    # cross-validation (group-local default): its steps come first; the final run's steps count on from them
    offset: int = 0
    selection: dict[str, Any] | None = None  # the "selection" event: chosen steps and the cross-validated estimate

    def apply(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "crossval":  # progress over every fold's run, plus the final run at its longest
            self.step = int(event.get("done", self.step))
            self.total_steps = int(event.get("total", 0)) + int(event.get("horizon", 0))
            self.offset = int(event.get("total", 0))
            if self.first_step_at is None:
                self.first_step_at = (time.monotonic(), self.step)
        elif kind == "selection":
            self.selection = {k: v for k, v in event.items() if k not in ("event", "time")}
            self.total_steps = self.offset + int(event.get("steps") or 0)
        elif kind == "start":
            total = event.get("total_steps") if event.get("total_steps") is not None else event.get("steps")
            self.total_steps = self.offset + int(total if total is not None else self.total_steps - self.offset)
        elif kind == "step":
            self.step = self.offset + int(event.get("step", self.step - self.offset + 1))
            total = event.get("total_steps") or event.get("total")
            self.total_steps = self.offset + int(total) if total else self.total_steps
            if self.first_step_at is None:
                self.first_step_at = (time.monotonic(), self.step)
            if isinstance(event.get("eta_s"), (int, float)):
                self.engine_eta = float(event["eta_s"])
            loss = event.get("loss")
            if isinstance(loss, (int, float)) and math.isfinite(loss):
                self.losses.append((self.step, float(loss)))
        elif kind == "val":
            for g, dice in group_dice(event).items():
                self.val.setdefault(g, []).append((int(event.get("step", self.step)), dice))
        elif kind == "checkpoint":
            path = event.get("path") or event.get("last")
            if path:
                self.checkpoints.append(str(path))
            if event.get("best"):
                self.best = str(event["best"]) if isinstance(event["best"], str) else str(path)
        elif kind == "done":
            self.done = True
            self.best = str(event.get("best_path") or event.get("best") or self.best or "") or None
            if isinstance(event.get("best_step"), int):
                self.best_step = event["best_step"]
        elif kind == "error":
            self.error = str(event.get("message") or event.get("error") or "training failed")

    def eta_seconds(self) -> float | None:
        """Seconds left: the engine's estimate, else the pace since the first step (which includes start-up)."""
        if self.engine_eta is not None:
            return self.engine_eta
        if self.first_step_at is None or not self.total_steps:
            return None
        t0, s0 = self.first_step_at
        done = self.step - s0
        if done <= 0:
            return None
        return (time.monotonic() - t0) / done * max(0, self.total_steps - self.step)
