"""``dmoe train`` as a real subprocess: every public data format, a SIGKILL mid-run then resume, torchrun."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from napari_dmoe.io.checkpoint import load_model
from napari_dmoe.training.config import load_config
from napari_dmoe.training.engine import train
from training_data import tiny_config, write_fairseg, write_folder, write_ham10000, write_nifti

pytestmark = pytest.mark.slow  # subprocesses or real training: over ~5 s each

DMOE = [sys.executable, "-m", "napari_dmoe.cli.main"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # same thread count as the in-process runs (bit-exact checks)


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _dataset(kind: str, tmp_path: Path) -> tuple[dict, str]:
    if kind == "fairseg":
        root = write_fairseg(tmp_path / "fairseg")
        return {"format": "fairseg", "root": str(root), "attributes": "race", "crop": None}, "transunet2d-tiny"
    if kind == "ham10000":
        root = write_ham10000(tmp_path / "ham")
        return {"format": "ham10000", "root": str(root), "attributes": "age", "val_fraction": 0.2,
                "test_fraction": 0.2}, "transunet2d-tiny"
    if kind == "nifti":
        root = write_nifti(tmp_path / "prostate", n=6)
        return {"format": "nifti", "root": str(root), "attributes": "stage", "class_names": ["background", "ctv"],
                "normalization": {"kind": "window", "low": -100, "high": 200}, "val_fraction": 0.2,
                "test_fraction": 0.2}, "resunet3d-tiny"
    root = write_folder(tmp_path / "folder")
    return {"format": "folder", "root": str(root), "split_column": "split", "class_names": ["background", "disc"],
            "attributes": {"sex": ["F", "M"]}}, "transunet2d-tiny"


@pytest.mark.parametrize("kind", ["fairseg", "ham10000", "nifti", "folder"])
def test_dmoe_train_subprocess_every_format(tmp_path, kind):
    data, preset = _dataset(kind, tmp_path)
    recipe = {"steps": 2, "batch_size": 2, "val_every": 2, **({"name": "3d"} if kind == "nifti" else {})}
    cfg = tiny_config(tmp_path / "c.yaml", tmp_path / "run", data, preset=preset, recipe=recipe)
    proc = subprocess.run([*DMOE, "train", str(cfg), "--events", "-", "--device", "cpu",
                           "--set", "augment.rotate90=true"],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]  # stdout holds nothing but events
    assert [e["event"] for e in events][0] == "start" and events[-1]["event"] == "done"
    val = next(e for e in events if e["event"] == "val")
    assert 0.0 <= val["es_dice"] <= val["dice"] <= 1.0 and val["groups"]
    model = load_model(tmp_path / "run" / "best.safetensors")
    assert model.spec.provenance["command"].startswith("dmoe train")
    assert model.spec.provenance["config"]["data"]["format"] == kind
    assert model.spec.metrics["step"] == 2 and "groups" in model.spec.metrics
    assert (tmp_path / "run" / "resume.json").is_file() and (tmp_path / "run" / "resume.safetensors").is_file()
    # evaluate the trained model on the test split, in process through the CLI entry point
    from napari_dmoe.cli.main import main

    assert main(["evaluate", str(tmp_path / "run" / "best.safetensors"), str(cfg), "--out", str(tmp_path / "ev"),
                 "--n-boot", "20", "--device", "cpu", "--quiet"]) == 0
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["n_images"] >= 1 and report["split"] == "test"
    assert (tmp_path / "ev" / "violin_dice.png").stat().st_size > 0


def test_config_error_exits_2_with_the_key(tmp_path):
    data, preset = _dataset("fairseg", tmp_path)
    cfg = tiny_config(tmp_path / "c.yaml", tmp_path / "run", data, preset=preset)
    proc = subprocess.run([*DMOE, "train", str(cfg), "--set", "recipe.lr=fast"], capture_output=True, text=True,
                          env=ENV, timeout=60)
    assert proc.returncode == 2
    assert "config key 'recipe.lr': expected a number, got 'fast'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing started


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    data, preset = _dataset("fairseg", tmp_path)
    recipe = {"steps": 12, "batch_size": 2, "val_every": 3, "checkpoint_every": 3}
    cfg = tiny_config(tmp_path / "c.yaml", tmp_path / "killed", data, preset=preset, recipe=recipe)
    events = tmp_path / "events.jsonl"
    proc = subprocess.Popen([*DMOE, "train", str(cfg), "--events", str(events), "--device", "cpu", "--quiet"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    try:
        while time.time() < deadline:
            if events.exists() and any(e["event"] == "checkpoint" and "resume" in e for e in _events(events)):
                proc.send_signal(signal.SIGKILL)
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.02)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(e["step"] for e in _events(events) if e["event"] == "step")
    assert killed_at < 12
    resumed = subprocess.run([*DMOE, "train", str(cfg), "--events", str(events), "--device", "cpu", "--resume",
                              "--quiet"], env=ENV, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    starts = [e for e in _events(events) if e["event"] == "start"]
    assert starts[-1]["resumed"] and starts[-1]["step"] in (3, 6, 9)

    config = load_config(cfg)
    config["output_dir"] = str(tmp_path / "straight")
    train(config, quiet=True, device="cpu")
    a = load_file(str(tmp_path / "straight" / "last.safetensors"))
    b = load_file(str(tmp_path / "killed" / "last.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    data, preset = _dataset("fairseg", tmp_path)
    recipe = {"steps": 4, "batch_size": 4, "val_every": 4}
    cfg = tiny_config(tmp_path / "c.yaml", tmp_path / "ddp", data, method="baseline", preset=preset, recipe=recipe,
                      augment={"flip": False})
    events = tmp_path / "ddp.jsonl"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "napari_dmoe.cli.main", "train", str(cfg), "--events", str(events), "--device", "cpu",
                           "--quiet"], env=ENV, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = _events(events)
    assert ddp[0]["world_size"] == 2
    assert sum(e["event"] == "start" for e in ddp) == 1  # only rank 0 writes events
    assert {"best.safetensors", "last.safetensors", "resume.json", "resume.safetensors", "history.jsonl",
            "progress.png"} <= {p.name for p in (tmp_path / "ddp").iterdir()}
    single_events = tmp_path / "one.jsonl"
    config = load_config(cfg)
    config["output_dir"] = str(tmp_path / "one")
    train(config, events=single_events, quiet=True, device="cpu")
    one = [e["loss"] for e in _events(single_events) if e["event"] == "step"]
    two = [e["loss"] for e in ddp if e["event"] == "step"]
    assert len(one) == len(two) == 4
    # Same samples per step and the same schedule; BatchNorm statistics and the batch-pooled Dice see one half of
    # the batch per process, so the curves agree closely but not exactly.
    assert one[0] == pytest.approx(two[0], rel=0.05)
    assert all(abs(a - b) < 0.05 for a, b in zip(one, two)), (one, two)
