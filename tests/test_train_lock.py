"""Issue 12: one `dmoe train` per output folder; a stale lock from a killed run does not block forever."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from napari_dmoe.training import lock
from training_data import tiny_config, write_fairseg


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_held_lock_is_refused_with_how_to_clear_it(tmp_path):
    path = lock.acquire(tmp_path, "dmoe train a.yaml")
    with pytest.raises(lock.LockError, match=f"in use by another dmoe train run .*pid {os.getpid()}.*delete {path}"):
        lock.acquire(tmp_path)
    lock.release(path)
    assert not path.exists()
    lock.release(lock.acquire(tmp_path))  # free again


def test_a_stale_lock_is_taken_over_with_a_note(tmp_path, capsys):
    stale = {"pid": dead_pid(), "host": socket.gethostname(), "started": time.time() - 3600, "command": "x"}
    (tmp_path / lock.LOCK_NAME).write_text(json.dumps(stale))
    path = lock.acquire(tmp_path)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    assert "took over the lock of a run that is gone" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [lock.LOCK_NAME]  # no temporary files left
    lock.release(path)


@pytest.mark.parametrize("content", [{"pid": 1, "host": "another-host", "started": 0}, "garbage"])
def test_a_lock_that_cannot_be_judged_here_is_refused(tmp_path, content):
    (tmp_path / lock.LOCK_NAME).write_text(json.dumps(content) if isinstance(content, dict) else content)
    with pytest.raises(lock.LockError, match="If no such run is alive, delete"):
        lock.acquire(tmp_path)
    lock.release(tmp_path / lock.LOCK_NAME)  # not ours: stays
    assert (tmp_path / lock.LOCK_NAME).exists()


@pytest.mark.slow
def test_two_real_train_processes_on_one_output_dir(tmp_path):
    data = write_fairseg(tmp_path / "fairseg", n_train=12, n_test=4, size=32)
    out = tmp_path / "run"
    config = tiny_config(tmp_path / "c.yaml", out, {"format": "fairseg", "root": str(data), "attributes": "race",
                                                      "val_fraction": 0.25}, recipe={"steps": 40, "val_every": 20})
    cmd = [sys.executable, "-m", "napari_dmoe.cli.main", "train", str(config), "--device", "cpu", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while not (out / lock.LOCK_NAME).exists():
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "the first run never took the lock"
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGSTOP)  # hold the first run mid-way (a slow machine must not let it finish first)
    try:
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
        running = first.poll() is None  # the refusal came while the first run held the folder
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2, second.stderr
    assert "in use by another dmoe train run" in second.stderr and f"pid {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    assert running
    assert not (out / lock.LOCK_NAME).exists()  # released at the end
    resume = json.loads((out / "resume.json").read_text())
    assert resume["step"] == 40  # one run's checkpoints, not two interleaved
    third = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert third.returncode == 0, third.stderr  # the folder is free again (already finished: nothing to do)
