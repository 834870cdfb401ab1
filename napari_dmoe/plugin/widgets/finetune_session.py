"""One fine-tune run, start to end: export and launch, poll, training ended, compare, finish or fail; cancel/kill.

The fine-tune widget (``finetune_widget.py``) owns one ``FinetuneSession``. The session knows nothing of the
widget's layout: it reports through Qt signals, which the widget wires to its labels, buttons, curve plot and
before/after table. ``dmoe train`` runs in a subprocess (``finetune.process.TrainingProcess``) polled by a QTimer
every 200 ms, so the GUI thread only reads a small events file. Afterwards a second subprocess compares the base
and the new model on the held-back pairs and saves the new model with its provenance; it is then registered in
the recent-model list the Segment widget reads.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari.utils import progress
from napari.utils.notifications import show_warning
from qtpy.QtCore import QObject, QTimer, Signal

from napari_dmoe.finetune.prepare import FinetuneError, FinetuneSettings, TrainingPair
from napari_dmoe.io.files import atomic_write_text

POLL_MS = 200
KILL_AFTER_S = 5.0


@dataclass
class RunRequest:
    """What one run needs, read from the widget: the base model, the pairs, the settings, where to write."""

    base: str
    spec: Any  # ModelSpec of the base model
    pairs: list[TrainingPair]
    is_val: list[bool]
    settings: FinetuneSettings  # settings.device is where both subprocesses run
    output: Path  # the run folder is made inside it
    extra_csv: str = ""  # optional user CSV of more training cases


class FinetuneSession(QObject):
    """The running TrainingProcess (training, then comparison), its progress bar and the cancel -> kill timer."""

    started = Signal(str)  # status text; a run began
    curves = Signal(object, bool, bool)  # RunState, new events arrived, force a redraw
    status = Signal(str)  # status text while running
    cancelling = Signal()  # SIGTERM sent; waiting for the process to go
    failed = Signal(str, str, str)  # title, reason, last lines of the process output
    compared = Signal(object)  # {"before", "after", "model"}: the new model is saved and registered
    finished = Signal(str)  # final status text: done, cancelled, failed or stopped

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        # Start builds the run's config, which imports every registered network (torch, MONAI: ~3 s on 2 cores);
        # done here in the background, the click does not freeze napari
        threading.Thread(target=_import_networks, name="dmoe-warm-up", daemon=True).start()
        self.process: Any = None  # the running TrainingProcess
        self.phase: str | None = None  # "train" | "compare" | None
        self.run_dir: Path | None = None
        self.base: str | None = None
        self.new_model: Path | None = None
        self.last_checkpoint: Path | None = None
        self.comparison: dict[str, Any] | None = None
        # called with the comparison before the new model is registered; False keeps it out of the model lists
        self.approve: Any = lambda comparison: True
        self._launch: dict[str, Any] = {}
        self._kill_at: float | None = None
        self._cancelled = False
        self._pbar: progress | None = None
        self.timer = QTimer(self)
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(self.poll)

    @property
    def busy(self) -> bool:
        return self.process is not None

    # -- start -----------------------------------------------------------------------------------------------
    def start(self, request: RunRequest) -> Any:
        """Export the pairs, write the config, start ``dmoe train``; returns the TrainingProcess.

        Raises FinetuneError (bad input), other ValueErrors (e.g. an image that cannot be written) or OSError;
        nothing is running then."""
        from napari_dmoe.finetune.prepare import append_csv_rows, build_config, export_pairs, write_config
        from napari_dmoe.finetune.process import TRAIN_EVENTS, TrainingProcess, train_command

        if self.process is not None:
            raise FinetuneError("a fine-tune is already running; cancel it first")
        spec, settings = request.spec, request.settings
        run_dir = Path(request.output).expanduser().resolve() / time.strftime("run-%Y%m%d-%H%M%S")
        while run_dir.exists():  # two starts in one second
            run_dir = run_dir.with_name(run_dir.name + "x")
        export = export_pairs(request.pairs, run_dir / "data", spec, request.is_val)
        extra = append_csv_rows(export.csv_path, request.extra_csv, spec)
        config = build_config(request.base, spec, export, run_dir / "train", settings,
                              name=f"finetune-{Path(request.base).stem}", n_train=len(export.train) + extra)
        config_path = write_config(config, run_dir / "finetune.yaml")
        provenance = {"data": export.to_dict(), "settings": vars(settings), "config": str(config_path)}
        atomic_write_text(run_dir / "provenance.json", json.dumps(provenance, indent=1))
        events = run_dir / TRAIN_EVENTS
        process = TrainingProcess(train_command(config_path, events, settings.device), run_dir, events=events)
        process.start()
        self.run_dir, self.base, self.new_model, self.comparison, self.last_checkpoint = (
            run_dir, request.base, None, None, None)
        self._launch = {"csv": str(export.csv_path), "device": settings.device, "output": run_dir / "train",
                        "steps": settings.steps}
        self.process, self.phase = process, "train"
        self._cancelled, self._kill_at = False, None
        self._close_progress()  # the napari progress bar is made at the first poll: creating one costs ~100 ms
        folds = (config.get("crossval") or {}).get("folds")
        n_pairs = len(export.train) + len(export.val)
        self.started.emit(f"Cross-validating on all {n_pairs} pair(s) ({min(folds, n_pairs)} folds: each is scored by "
                          f"a model that did not train on it), then training on all of them; run folder {run_dir}"
                          if folds else f"Training on {len(export.train)} pair(s), validating on {len(export.val)} "
                          f"({', '.join(export.val)}); run folder {run_dir}")
        self.timer.start()
        return process

    # -- stop ------------------------------------------------------------------------------------------------
    def cancel(self) -> bool:
        """Stop the running process: terminate now, kill if it is still there after ``KILL_AFTER_S``."""
        if self.process is None:
            return False
        self.process.terminate()
        self._cancelled = True
        self._kill_at = time.monotonic() + KILL_AFTER_S
        self.cancelling.emit()
        return True

    def stop_now(self) -> None:
        """Stop a running process without asking, blocking up to a few seconds (napari or the widget closes)."""
        if self.process is not None:
            self.process.stop(timeout=2.0)
            self._finish("Stopped: napari or the widget was closed.")

    # -- polling ---------------------------------------------------------------------------------------------
    def poll(self) -> None:
        """Timer slot: read new events, update the progress bar and curves, handle the end of a process."""
        process = self.process
        if process is None:
            self.timer.stop()
            return
        events = process.poll()
        if self.phase == "train":
            self._show_progress(process.state)
            self.curves.emit(process.state, bool(events), False)
        if process.returncode is None:
            if self._kill_at is not None and time.monotonic() > self._kill_at:
                process.kill()  # did not stop on SIGTERM
                self._kill_at = None
            return
        if self.phase == "train":
            self._train_ended(process)
        else:
            self._compare_ended(process)

    def _show_progress(self, state: Any) -> None:
        if self._pbar is None:
            self._pbar = progress(total=self._launch["steps"], desc="dMoE fine-tune: starting")
        if state.step:
            if state.total_steps and self._pbar.total != state.total_steps:
                self._pbar.total = state.total_steps
            eta = state.eta_seconds()
            loss = f"loss {state.losses[-1][1]:.3f}" if state.losses else ""
            self._pbar.set_description(f"dMoE fine-tune {loss}" + (f", ETA {eta:.0f} s" if eta is not None else ""))
            # forward only, by the difference: a bar that drops (or is reset to 0 first) reads as a restart
            self._pbar.update(max(0, min(state.step, self._pbar.total or state.step) - self._pbar.n))

    def _close_progress(self) -> None:
        if self._pbar is not None:
            self._pbar.close()
        self._pbar = None

    # -- ends ------------------------------------------------------------------------------------------------
    def _checkpoint(self, state: Any) -> Path | None:
        out = Path(self._launch["output"])
        for candidate in (state.best, out / "best.safetensors", out / "last.safetensors"):
            if candidate and Path(candidate).is_file():
                return Path(candidate)
        return None

    def _train_ended(self, process: Any) -> None:
        state = process.state
        self.curves.emit(state, True, True)
        self._close_progress()
        self.last_checkpoint = self._checkpoint(state)
        cancelled, self._cancelled, self._kill_at = self._cancelled, False, None
        if cancelled:
            kept = f"; last checkpoint kept: {self.last_checkpoint}" if self.last_checkpoint else ""
            self._finish(f"Cancelled at step {state.step}{kept}.")
            return
        failure = process.failure()
        if failure or self.last_checkpoint is None:
            self._fail("Fine-tune failed", failure or "the engine wrote no checkpoint", process.stderr_tail())
            return
        if state.best_step == 0 and state.selection:  # cross-validation: no step count gained on average
            estimate = state.selection.get("estimate") or {}
            self._finish(f"Cross-validation on your {state.selection.get('cases')} corrected pairs "
                         f"({state.selection.get('folds')} folds) found no step count that improves them on "
                         f"average (expected change {estimate.get('gain') or 0:+.3f}), so the base model is kept "
                         "and no new model was added. Add more corrected pairs.")
            return
        if state.best_step == 0:  # the base model, validated first, was never beaten: offer nothing new
            self._finish("No fine-tune step beat the base model on the held-back pairs, so the base model is kept "
                         "and no new model was added. Add more corrected pairs, or train longer; the final weights "
                         f"are in {Path(self._launch['output']) / 'last.safetensors'} if you want to look at them.")
            return
        self._start_compare(self.last_checkpoint)

    def _start_compare(self, trained: Path) -> None:
        from napari_dmoe.finetune.process import compare_process

        process, _ = compare_process(self.run_dir, self.base, trained, self._launch["csv"], self._launch["device"])
        try:
            process.start()
        except OSError as err:  # e.g. the run folder went away
            self._fail("Comparing the models failed", str(err), "")
            return
        self.process, self.phase = process, "compare"
        # a busy bar, not a new one at 0 %: training is done, the comparison has no steps to count
        self._pbar = progress(total=0, desc="dMoE fine-tune: comparing the base and the new model")
        self.status.emit("Training done; comparing the base and the new model on the validation pairs...")

    def _compare_ended(self, process: Any) -> None:
        from napari_dmoe.finetune.process import COMPARE_JSON
        from napari_dmoe.io.model_list import RegistryError
        from napari_dmoe.plugin.widgets.controls import ModelList

        result_path = self.run_dir / COMPARE_JSON
        if process.returncode != 0 or not result_path.is_file():
            self._fail("Comparing the models failed", process.failure() or "no result written",
                       process.stderr_tail())
            return
        self.comparison = json.loads(result_path.read_text(encoding="utf-8"))
        self.new_model = Path(self.comparison["model"])
        registered = self.approve(self.comparison)  # the widget asks first when a group got worse
        self.comparison["registered"] = registered
        if registered:
            try:
                ModelList.shared().add(self.new_model)  # listed at once in every widget's model picker
            except RegistryError as err:
                show_warning(f"The new model could not be added to the recent list: {err}")
        self.compared.emit(self.comparison)
        after = self.comparison["after"].get("all", float("nan"))
        before = self.comparison["before"].get("all", float("nan"))
        kept = "" if registered else "; NOT added to the model list (it stays in the run folder)"
        self._finish(f"Done: new model {self.new_model} (validation Dice {before:.3f} -> {after:.3f}){kept}.")

    def _fail(self, title: str, reason: str, tail: str) -> None:
        self.failed.emit(title, reason, tail)
        self._finish(f"{title}: {reason}")

    def _finish(self, text: str) -> None:
        self.timer.stop()
        self._close_progress()
        self.process, self.phase = None, None
        self.finished.emit(text)


def _import_networks() -> None:
    try:
        from napari_dmoe.model.registry import PRESETS

        list(PRESETS)
    except Exception:  # nothing is lost: Start imports them again and reports what fails
        pass
