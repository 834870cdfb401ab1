"""Run ``dmoe train`` (and the before/after comparison) in a subprocess and follow its JSON-lines events.

Qt-free so it is testable headless: the widget polls ``TrainingProcess.poll()`` from a QTimer. A subprocess
(MONAI Label's pattern) rather than a thread: Cancel really stops the work, GPU memory goes back to the system,
and the GUI process never shares the GIL with the training loop. stdout/stderr go to files, not pipes, so a
chatty child can never block on a full pipe while the GUI is busy.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from napari_dmoe.finetune.run_state import EventReader, RunState
from napari_dmoe.threads import ENV_RESERVE

TRAIN_EVENTS = "events.jsonl"
COMPARE_JSON = "compare.json"


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
        # the child's automatic thread count keeps one core free for napari, which draws while it trains
        env.setdefault(ENV_RESERVE, "1")
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
    cmd = [sys.executable, "-m", "napari_dmoe.cli.main", "finetune-compare", str(base), str(trained),
           str(csv_path), str(out_model), "--provenance", str(run_dir / "provenance.json"),
           "--out", str(run_dir / COMPARE_JSON), "--device", device]
    process = TrainingProcess(cmd, run_dir, events=run_dir / "compare-events.jsonl")
    process.stderr_path = run_dir / "compare-stderr.log"
    return process, out_model
