"""What a training run leaves for people and programs without a terminal (a cluster log, the GUI fine-tune):
``history.jsonl`` and ``progress.png`` in the run folder, and plain progress lines.

It listens to the engine's events (``events.EventWriter``), so the engine reports each fact once.

``history.jsonl``: one JSON object per line, appended and flushed as the run goes (a reader skips a last line
that is not complete yet):
  ``{"kind": "train", "step": 40, "epoch": 1, "time": 1764518400.5, "loss": 0.412, "lr": 0.0093}``
      every ``every`` steps; ``loss`` is the mean over the steps since the previous train line, ``lr`` the last.
  ``{"kind": "val", "step": 40, "epoch": 1, "time": ..., "es_dice": 0.71, "dice": 0.75,
     "groups": {"Asian": 0.77, "Black": 0.70}}``  at each validation; ``groups``: mean Dice over classes.
A resumed run first drops the lines after its resume step (the killed run's steps are redone).

``progress.png``: training loss and validation Dice per group (and ES-Dice) against the step, rewritten
atomically at each validation, as nnU-Net's progress.png.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, TextIO

from napari_dmoe.io.files import atomic_write

HISTORY = "history.jsonl"
PLOT = "progress.png"


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """The records of a history file; an incomplete or broken line (a run writing or killed) is skipped."""
    records = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return records
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class RunHistory:
    """Listener of the engine's events (rank 0): writes the history and the plot, and prints plain lines to
    ``lines`` (None: print nothing) every ``print_every`` steps, at each validation and at the end."""

    def __init__(self, folder: str | Path, lines: TextIO | None = None) -> None:
        self.folder, self.lines = Path(folder), lines
        self.records: list[dict[str, Any]] = []
        self.total = 0
        self.every = self.print_every = 1
        self._losses: list[float] = []  # since the last train line
        self._said: list[float] = []  # since the last printed line
        self._mark: tuple[int, float] | None = None  # (step, time) of the last printed line
        self._best: tuple[float, int] | None = None

    def __call__(self, event: str, record: dict[str, Any]) -> None:
        handler = getattr(self, f"_on_{event}", None)
        if handler is not None:
            handler(record)

    def _on_start(self, r: dict[str, Any]) -> None:
        self.total, start = int(r["total_steps"]), int(r["step"])
        self.every = max(1, self.total // 1000)  # about 1000 points for the curve
        self.print_every = max(1, self.total // 100)
        self.folder.mkdir(parents=True, exist_ok=True)
        # a resumed run redoes the steps after its checkpoint: their old lines go; a new run starts a new file
        self.records = [x for x in read_history(self.folder / HISTORY) if start and int(x["step"]) <= start]
        text = "".join(json.dumps(x) + "\n" for x in self.records)
        atomic_write(self.folder / HISTORY, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        self._mark = (start, time.time())
        self._say(f"training {self.total} steps (batch {r.get('batch_size')}, {r.get('world_size', 1)} "
                  f"process(es), {r.get('device')}{_threads(r)}){f', resumed at step {start}' if start else ''}; "
                  f"history: {self.folder / HISTORY}")

    def _on_step(self, r: dict[str, Any]) -> None:
        step = int(r["step"])
        if r.get("loss") is not None:
            self._losses.append(float(r["loss"]))
            self._said.append(float(r["loss"]))
        if step % self.every == 0 or step == self.total:
            loss = sum(self._losses) / len(self._losses) if self._losses else None
            self._append({"kind": "train", "step": step, "epoch": r.get("epoch"), "time": r["time"], "loss": loss,
                          "lr": r.get("lr")})
            self._losses = []
        if step % self.print_every == 0 or step == self.total or step == 1:
            loss = sum(self._said) / len(self._said) if self._said else None
            self._said = []
            self._say(f"step {step}/{self.total} ({100 * step / max(self.total, 1):.1f}%) epoch {r.get('epoch')} "
                      f"loss {_fmt(loss)} lr {float(r.get('lr') or 0):.3g}{self._rate(step)}")

    def _on_val(self, r: dict[str, Any]) -> None:
        step, es = int(r["step"]), r.get("es_dice")
        groups = {str(g): v for g, v in (r.get("groups") or {}).items()}
        self._append({"kind": "val", "step": step, "epoch": r.get("epoch"), "time": r["time"], "es_dice": es,
                      "dice": r.get("dice"), "groups": groups})
        if es is not None and (self._best is None or es > self._best[0]):
            self._best = (es, step)
        best = f" | best {self._best[0]:.4f} (step {self._best[1]})" if self._best else ""
        per_group = " ".join(f"{g} {v:.3f}" for g, v in groups.items() if v is not None)
        self._say(f"step {step}/{self.total} validation: ES-Dice {_fmt(es)} Dice {_fmt(r.get('dice'))} | "
                  f"{per_group}{best}")
        atomic_write(self.folder / PLOT, lambda tmp: plot_progress(self.records, tmp))

    def _on_done(self, r: dict[str, Any]) -> None:
        at = " = the starting weights: no step beat them" if r.get("best_step") == 0 else ""
        self._say(f"done: {r.get('step')} steps in {_clock(float(r.get('seconds') or 0))}; best model "
                  f"{r.get('best_path')} (validation ES-Dice {_fmt(r.get('best_es_dice'))}{at})")

    def _on_error(self, r: dict[str, Any]) -> None:
        self._say(f"stopped: {r.get('message')}")

    def _rate(self, step: int) -> str:
        """Steps per second since the last line (validation included: what the ETA will really see)."""
        now = time.time()
        if self._mark is None or step <= self._mark[0]:
            return ""
        rate = (step - self._mark[0]) / max(now - self._mark[1], 1e-9)
        self._mark = (step, now)
        return f" | {rate:.3g} steps/s, ETA {_clock((self.total - step) / rate)}"

    def _append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with open(self.folder / HISTORY, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _say(self, text: str) -> None:
        if self.lines is not None:
            print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {text}", file=self.lines, flush=True)


def _threads(r: dict[str, Any]) -> str:
    """", 1 CPU thread (auto: ...)" from the start event (older event files have none)."""
    n = r.get("threads")
    return "" if n is None else f", {n} CPU thread{'s' * (n != 1)} ({r.get('threads_reason')})"


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.4f}"


def plot_progress(records: list[dict[str, Any]], path: str | Path) -> None:
    """Loss (top) and validation Dice per group with ES-Dice (bottom) against the step, as a PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 6), dpi=100, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    train = [r for r in records if r.get("kind") == "train" and r.get("loss") is not None]
    top.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue", lw=1)
    top.set_ylabel("training loss")
    top.grid(alpha=0.3)
    val = [r for r in records if r.get("kind") == "val"]
    steps = [r["step"] for r in val]
    for g in sorted({g for r in val for g in r.get("groups", {})}):
        bottom.plot(steps, [r.get("groups", {}).get(g, math.nan) for r in val], marker="o", ms=3, lw=1, label=g)
    if val:
        bottom.plot(steps, [math.nan if r.get("es_dice") is None else r["es_dice"] for r in val], color="black",
                    lw=2, ls="--", label="ES-Dice")
        bottom.legend(fontsize=8, loc="lower right")
    bottom.set_xlabel("step")
    bottom.set_ylabel("validation Dice")
    bottom.grid(alpha=0.3)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
