"""Run ``dmoe train`` in a subprocess and follow its JSON-lines events; compare base and fine-tuned models.

Qt-free so it is testable headless: the widget polls ``TrainingProcess.poll()`` from a QTimer. A subprocess
(MONAI Label's pattern) rather than a thread: Cancel really stops the work, GPU memory goes back to the system,
and the GUI process never shares the GIL with the training loop. stdout/stderr go to files, not pipes, so a
chatty child can never block on a full pipe while the GUI is busy.

``python -m napari_dmoe.finetune.run compare ...`` evaluates the base and the new model on the validation pairs
with the inference engine (what the user will get in the Segment widget) and saves the final model with its
fine-tune provenance.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

TRAIN_EVENTS = "events.jsonl"
COMPARE_JSON = "compare.json"


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


def _group_dice(event: dict[str, Any]) -> dict[str, float]:
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
    done: bool = False
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    first_step_at: tuple[float, int] | None = None
    engine_eta: float | None = None  # the engine's own estimate (smoothed step time), preferred when given

    def apply(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "start":
            self.total_steps = int(event.get("total_steps") or event.get("steps") or self.total_steps)
        elif kind == "step":
            self.step = int(event.get("step", self.step + 1))
            self.total_steps = int(event.get("total_steps") or event.get("total") or self.total_steps)
            if self.first_step_at is None:
                self.first_step_at = (time.monotonic(), self.step)
            if isinstance(event.get("eta_s"), (int, float)):
                self.engine_eta = float(event["eta_s"])
            loss = event.get("loss")
            if isinstance(loss, (int, float)) and math.isfinite(loss):
                self.losses.append((self.step, float(loss)))
        elif kind == "val":
            for g, dice in _group_dice(event).items():
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


def train_command(config: str | os.PathLike, events: str | os.PathLike, device: str | None = None,
                  overrides: Sequence[str] = ()) -> list[str]:
    """``dmoe train`` through this very interpreter (the console script may not be on PATH in a GUI app)."""
    cmd = [sys.executable, "-m", "napari_dmoe.cli.main", "train", str(config), "--events", str(events)]
    for item in overrides:
        cmd += ["--set", item]
    if device:
        cmd += ["--device", device]
    return cmd


class TrainingProcess:
    """One child process with its events file and stderr log; ``poll`` never blocks."""

    def __init__(self, cmd: Sequence[str], run_dir: str | os.PathLike, events: str | os.PathLike | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cmd = list(cmd)
        self.events_path = Path(events) if events else self.run_dir / TRAIN_EVENTS
        self.stderr_path = self.run_dir / "stderr.log"
        self.stdout_path = self.run_dir / "stdout.log"
        self.reader = EventReader(self.events_path)
        self.state = RunState()
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self.env = env

    def start(self) -> None:
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            # own process group: terminate() reaches any data-loader workers the engine starts
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
                                         cwd=str(self.run_dir), start_new_session=(os.name == "posix"))

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def poll(self) -> list[dict[str, Any]]:
        """New events since the last call (applied to ``state``); sets ``returncode`` once the child exits."""
        events = self.reader.read()
        for event in events:
            self.state.apply(event)
        if self.proc is not None and self.returncode is None:
            code = self.proc.poll()
            if code is not None:
                self.returncode = code
                late = self.reader.read()  # events written just before exit
                for event in late:
                    self.state.apply(event)
                events += late
        return events

    def stderr_tail(self, n: int = 12) -> str:
        try:
            lines = self.stderr_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(line for line in lines[-n:])

    def failure(self) -> str | None:
        """A readable reason when the child failed (error event, else the end of its stderr), else None."""
        if self.returncode in (None, 0) and not self.state.error:
            return None
        reason = self.state.error or ""
        tail = self.stderr_tail()
        if not reason:
            reason = tail.splitlines()[-1] if tail else f"the process exited with code {self.returncode}"
        return reason

    def stop(self, timeout: float = 5.0) -> int | None:
        """Terminate (SIGTERM to the process group), then kill after ``timeout`` s; return the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                self.proc.wait(timeout)
        self.poll()
        return self.proc.returncode

    def terminate(self) -> None:
        """Ask the child to stop (SIGTERM); non-blocking."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """Stop the child now (SIGKILL where there is one); non-blocking."""
        self._signal(signal.SIGKILL if hasattr(signal, "SIGKILL") else signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            if os.name == "posix":
                os.killpg(self.proc.pid, sig)
            elif sig == signal.SIGTERM:
                self.proc.terminate()
            else:
                self.proc.kill()
        except ProcessLookupError:
            pass


def compare_process(run_dir: str | os.PathLike, base: str | os.PathLike, trained: str | os.PathLike,
                    csv_path: str | os.PathLike, device: str = "cpu") -> tuple[TrainingProcess, Path]:
    """The (not yet started) comparison subprocess of a run folder and the path the final model will get.

    It reads ``run_dir/provenance.json`` and writes ``run_dir/compare.json`` and the final model."""
    run_dir = Path(run_dir)
    stamp = run_dir.name.removeprefix("run-")
    out_model = run_dir / f"{Path(base).stem}-finetuned-{stamp}.safetensors"
    cmd = [sys.executable, "-m", "napari_dmoe.finetune.run", "compare", str(base), str(trained), str(csv_path),
           str(out_model), "--provenance", str(run_dir / "provenance.json"), "--out", str(run_dir / COMPARE_JSON),
           "--device", device]
    process = TrainingProcess(cmd, run_dir, events=run_dir / "compare-events.jsonl")
    process.stderr_path = run_dir / "compare-stderr.log"
    return process, out_model


# -- before/after comparison (runs in its own subprocess) --------------------------------------------------
def _mean_dice(metrics: dict[str, dict[str, float]]) -> float:
    values = [m["dice"] for m in metrics.values() if not math.isnan(m["dice"])]
    return float(sum(values) / len(values)) if values else math.nan


def evaluate_on_pairs(model_path: str | os.PathLike, csv_path: str | os.PathLike, split: str = "val",
                      device: str = "cpu") -> dict[str, float]:
    """Mean foreground Dice per group (and "all") of a model on the ``split`` rows of a fine-tune CSV."""
    import csv

    from napari_dmoe.io.checkpoint import load_model
    from napari_dmoe.io.images import read_image
    from napari_dmoe.evaluation.fairness import image_metrics
    from napari_dmoe.inference.engine import segment

    model = load_model(model_path)
    spec = model.spec
    names = [a.name for a in spec.attributes]
    csv_path = Path(csv_path)
    with open(csv_path, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("split", "train") == split]
    per_group: dict[str, list[float]] = {}
    for row in rows:
        image = read_image(csv_path.parent / row["image"])
        labels = read_image(csv_path.parent / row["mask"]).array
        attribute = {n: row[n] for n in names}
        spacing = image.spacing if image.meta.get("spacing_known") else None  # resampled as the Segment widget does
        seg = segment(model, image.array, attribute if len(names) > 1 else attribute[names[0]], device=device,
                      routing=False, rgb=bool(image.meta.get("rgb")), spacing=spacing)
        dice = _mean_dice(image_metrics(seg.labels, labels, spec.n_classes, class_names=spec.class_names))
        group = "/".join(attribute[n] for n in names)
        per_group.setdefault(group, []).append(dice)
        per_group.setdefault("all", []).append(dice)
    return {g: float(sum(v) / len(v)) for g, v in per_group.items()}


RUN_FOLDER = "<fine-tune run folder>"


def shareable(provenance: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The provenance a fine-tuned model file carries, safe to share with another site.

    Models travel; the names of the cases they were tuned on must not. Case names come from layer names, which
    often hold patient names or IDs, and local folders may too. So the model keeps how many cases per split and
    per attribute value, the settings and the base model's file name; the case list and the full paths stay in
    the run folder (``provenance.json``, ``pairs.csv``), which never leaves the machine."""
    out = _replace_paths(provenance, str(run_dir), RUN_FOLDER)
    base = str((provenance.get("finetune") or {}).get("base_model") or "")
    if base:  # the engine records the base model's full path too (config, init)
        for form in {base, str(Path(base).resolve())}:
            out = _replace_paths(out, form, Path(base).name)
    tune = dict(out.get("finetune") or {})
    data = dict(tune.get("data") or {})
    for split in ("train", "val"):
        if isinstance(data.get(split), list):
            data[f"n_{split}"] = len(data.pop(split))
    data.pop("csv_path", None)
    tune["data"] = data
    for key in ("base_model", "config"):
        if tune.get(key):
            tune[key] = Path(str(tune[key])).name
    out["finetune"] = tune
    return out


def _replace_paths(value: Any, old: str, new: str) -> Any:
    if isinstance(value, dict):
        return {k: _replace_paths(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_paths(v, old, new) for v in value]
    return value.replace(old, new) if isinstance(value, str) else value


def compare_and_save(base: str, trained: str, csv_path: str, out_model: str, provenance: dict[str, Any],
                     device: str = "cpu") -> dict[str, Any]:
    """Evaluate base and fine-tuned models on the validation pairs; save the fine-tuned model (atomically) with
    the fine-tune provenance (``shareable``: no case names or local paths) and the after-metrics in its spec;
    return ``{"before", "after", "model"}``."""
    from napari_dmoe.io.checkpoint import load_model, save_model

    before = evaluate_on_pairs(base, csv_path, device=device)
    after = evaluate_on_pairs(trained, csv_path, device=device)
    model = load_model(trained)
    spec = model.spec
    run_dir = Path(out_model).resolve().parent
    spec.provenance = shareable({**spec.provenance, "finetune": {**provenance, "base_model": str(base)}}, run_dir)
    spec.metrics = {**spec.metrics, "finetune_validation_dice": {"before": before, "after": after}}
    save_model(out_model, model.network, spec)
    return {"before": before, "after": after, "model": str(Path(out_model).resolve())}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m napari_dmoe.finetune.run")
    sub = parser.add_subparsers(dest="command", required=True)
    cmp_ = sub.add_parser("compare", help="before/after Dice on the validation pairs; save the final model")
    cmp_.add_argument("base")
    cmp_.add_argument("trained")
    cmp_.add_argument("csv")
    cmp_.add_argument("out_model")
    cmp_.add_argument("--provenance", help="JSON file with the fine-tune provenance")
    cmp_.add_argument("--out", default=COMPARE_JSON)
    cmp_.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        prov = json.loads(Path(args.provenance).read_text(encoding="utf-8")) if args.provenance else {}
        result = compare_and_save(args.base, args.trained, args.csv, args.out_model, prov, args.device)
    except (ValueError, OSError) as err:
        print(f"fine-tune comparison failed: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    Path(args.out).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
