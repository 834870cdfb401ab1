"""A training run without a terminal: plain progress lines, history.jsonl and progress.png in the run folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from training_data import tiny_config, write_fairseg

from napari_dmoe.training.history import HISTORY, PLOT, RunHistory, read_history

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_train_with_stdout_in_a_file_writes_lines_history_and_plot(tmp_path):
    root = write_fairseg(tmp_path / "fairseg", n_train=8, n_test=3)
    cfg = tiny_config(tmp_path / "c.yaml", tmp_path / "run",
                      {"format": "fairseg", "root": str(root), "attributes": "race", "crop": None,
                       "val_fraction": 0.25}, recipe={"steps": 6, "batch_size": 2, "val_every": 3})
    log = tmp_path / "slurm.out"
    with open(log, "w") as out:  # as a batch scheduler runs it: stdout is a file, no terminal
        proc = subprocess.run([sys.executable, "-m", "napari_dmoe.cli.main", "train", str(cfg), "--device", "cpu"],
                              check=False, stdout=out, stderr=subprocess.PIPE, text=True, env=ENV, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = log.read_text().splitlines()
    steps = [line for line in lines if "] step " in line and "loss" in line]
    assert len(steps) == 6 and "step 6/6 (100.0%)" in steps[-1]
    assert "steps/s, ETA 0:00:00" in steps[-1] and "ETA" in steps[1]
    vals = [line for line in lines if "validation: ES-Dice" in line]
    assert len(vals) == 2 and "step 3/6" in vals[0] and "best" in vals[1]
    assert any(line.split("] ", 1)[1].startswith("done: 6 steps") for line in lines)
    history = read_history(tmp_path / "run" / HISTORY)
    train = [r for r in history if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] > 0 and r["lr"] > 0 for r in train)
    val = [r for r in history if r["kind"] == "val"]
    assert [r["step"] for r in val] == [3, 6]
    assert set(val[0]["groups"]) <= {"Asian", "Black", "White"} and val[0]["groups"]
    assert 0 <= val[-1]["es_dice"] <= val[-1]["dice"] <= 1
    assert (tmp_path / "run" / PLOT).read_bytes()[:8] == PNG


def _event(name, **fields):
    return name, {"event": name, "time": 1.0, **fields}


def test_resumed_run_drops_the_lines_after_its_checkpoint_and_skips_a_torn_line(tmp_path):
    h = RunHistory(tmp_path)
    h(*_event("start", step=0, total_steps=8))
    for step in range(1, 7):
        h(*_event("step", step=step, epoch=0, loss=1.0 / step, lr=0.1))
        if step == 4:
            h(*_event("val", step=4, epoch=0, es_dice=0.5, dice=0.6, groups={"a": 0.6}))
    with open(tmp_path / HISTORY, "a") as f:
        f.write('{"kind": "train", "st')  # killed in the middle of a line
    assert [r["step"] for r in read_history(tmp_path / HISTORY)] == [1, 2, 3, 4, 4, 5, 6]
    resumed = RunHistory(tmp_path)
    resumed(*_event("start", step=4, total_steps=8))  # the checkpoint was at step 4: steps 5, 6 are redone
    assert [r["step"] for r in read_history(tmp_path / HISTORY)] == [1, 2, 3, 4, 4]
    resumed(*_event("step", step=5, epoch=0, loss=0.3, lr=0.1))
    resumed(*_event("val", step=5, epoch=0, es_dice=None, dice=None, groups={}))
    text = (tmp_path / HISTORY).read_text().splitlines()
    assert json.loads(text[-2]) == {"kind": "train", "step": 5, "epoch": 0, "time": 1.0, "loss": 0.3, "lr": 0.1}
    assert (tmp_path / PLOT).read_bytes()[:8] == PNG
    RunHistory(tmp_path)(*_event("start", step=0, total_steps=8))  # a new run starts a new history
    assert read_history(tmp_path / HISTORY) == []
