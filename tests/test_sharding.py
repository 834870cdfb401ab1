"""``dmoe segment --csv`` and ``dmoe evaluate`` under torchrun: 2 real CPU processes (Gloo) against 1."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from inference_models import make_model
from PIL import Image

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
DMOE = str(Path(sys.executable).with_name("dmoe"))  # the console script, as the README's torchrun line runs it
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
RACES = ["Asian", "Black", "White"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("model") / "tiny.safetensors")


def _images(folder: Path, n: int, size: int = 48, bad: tuple[int, ...] = ()) -> Path:
    """n PNG images and cases.csv (image, race); the cases in ``bad`` are not images."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = ["image,race"]
    for i in range(n):
        name = f"img{i:02d}.png"
        if i in bad:
            (folder / name).write_bytes(b"not a png")
        else:
            Image.fromarray((rng.random((size, size)) * 255).astype(np.uint8)).save(folder / name)
        rows.append(f"{name},{RACES[i % 3]}")
    (folder.parent / "cases.csv").write_text("\n".join(rows) + "\n")
    return folder.parent / "cases.csv"


def _segment(model, images: Path, csv: Path, out: Path, procs: int = 2, **popen):
    cmd = [*(TORCHRUN if procs > 1 else [sys.executable]), DMOE, "segment", str(model), str(images), "--csv",
           str(csv), "-o", str(out), "--device", "cpu", "--force"]
    if popen:
        return subprocess.Popen(cmd, env=ENV, **popen)
    return subprocess.run(cmd, check=False, env=ENV, capture_output=True, text=True, timeout=240)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _labels(out: Path) -> list[Path]:
    """Finished label files: pathlib's glob also matches the hidden temporary a killed write leaves behind."""
    return [p for p in out.glob("*_labels.png") if not p.name.startswith(".")]


def _written(stdout: str) -> list[str]:
    return sorted(line.split(" -> ")[1].split(" (")[0] for line in stdout.splitlines() if " -> " in line)


def test_sharded_segment_writes_each_output_once_and_gathers_failures(tmp_path, model):
    csv = _images(tmp_path / "images", 7, bad=(4,))
    proc = _segment(model, tmp_path / "images", csv, tmp_path / "out")
    assert proc.returncode == 1, proc.stderr[-3000:]  # one case failed: the batch says so, on every rank
    expected = [str(tmp_path / "out" / f"img{i:02d}_labels.png") for i in range(7) if i != 4]
    assert _written(proc.stdout) == expected, proc.stdout  # each case done by one process, once
    # each mask and its provenance sidecar (a PNG has no room for it), nothing else: no temporary, no duplicate
    names = [Path(e).name for e in expected]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(names + [n + ".json" for n in names])
    assert proc.stdout.count("6 of 7 images segmented") == 1  # rank 0 alone sums up
    summary = proc.stderr[proc.stderr.index("1 of 7 images failed:"):]
    assert proc.stderr.count("images failed:") == 1 and "img04.png:" in summary
    assert "[7/7] images:" in proc.stderr  # rank 0's counter covers both processes' cases
    single = _segment(model, tmp_path / "images", csv, tmp_path / "one", procs=1)
    for path in expected:  # the same masks as one process
        a, b = np.asarray(Image.open(path)), np.asarray(Image.open(tmp_path / "one" / Path(path).name))
        np.testing.assert_array_equal(a, b)
    assert single.returncode == 1 and "img04.png:" in single.stderr


def test_killed_sharded_run_resumes_without_redoing_finished_cases(tmp_path, model):
    n = 24
    csv = _images(tmp_path / "images", n, size=160)
    out = tmp_path / "out"
    proc = _segment(model, tmp_path / "images", csv, out, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    try:
        while time.time() < deadline and len(_labels(out)) < 4:
            assert proc.poll() is None, "the batch ended before it could be killed"
            time.sleep(0.02)
    finally:
        tree = [proc.pid, *_descendants(proc.pid)]
        for pid in tree:  # torchrun and its workers, as a scheduler's kill would
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
        for pid in tree:  # dead, not dying: a worker may finish the write (rename) it is in
            while _alive(pid):
                time.sleep(0.01)
    finished = {p.name: p.stat().st_mtime_ns for p in _labels(out)}
    assert 4 <= len(finished) < n
    rerun = _segment(model, tmp_path / "images", csv, out)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{len(finished)} of {n} images already done: skipped" in rerun.stderr
    redone = [Path(p).name for p in _written(rerun.stdout)]
    assert not set(redone) & set(finished) and len(redone) == n - len(finished)
    assert {p.name: p.stat().st_mtime_ns for p in _labels(out) if p.name in finished} == finished
    assert len(_labels(out)) == n
    for p in _labels(out):  # complete files (a killed write leaves only a hidden temporary)
        assert np.asarray(Image.open(p)).shape == (160, 160)


def test_sharded_evaluate_equals_one_process(tmp_path, model):
    from training_data import tiny_config, write_fairseg

    root = write_fairseg(tmp_path / "fairseg", n_train=2, n_test=7)
    cfg = tiny_config(tmp_path / "data.yaml", tmp_path / "unused",
                      {"format": "fairseg", "root": str(root), "attributes": "race", "crop": None})
    reports = {}
    for procs, name in ((2, "two"), (1, "one")):
        cmd = [*(TORCHRUN if procs > 1 else [sys.executable]), DMOE, "evaluate", str(model), str(cfg), "--out",
               str(tmp_path / name), "--n-boot", "200", "--device", "cpu"]
        proc = subprocess.run(cmd, check=False, env=ENV, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
        if procs > 1:
            assert proc.stdout.count("7 images, Dice") == 1  # rank 0 alone reports
    assert reports["two"]["n_images"] == 7
    assert reports["two"] == reports["one"]  # every number, the bootstrap CIs too
    assert (tmp_path / "two" / "report.csv").read_text() == (tmp_path / "one" / "report.csv").read_text()


def test_evaluate_continues_from_the_records_of_a_stopped_run(tmp_path, model):
    from training_data import tiny_config, write_fairseg

    root = write_fairseg(tmp_path / "fairseg", n_train=2, n_test=6)
    cfg = tiny_config(tmp_path / "data.yaml", tmp_path / "unused",
                      {"format": "fairseg", "root": str(root), "attributes": "race", "crop": None})
    out = tmp_path / "ev"

    def evaluate(procs):
        cmd = [*(TORCHRUN if procs > 1 else [sys.executable]), DMOE, "evaluate", str(model), str(cfg), "--out",
               str(out), "--n-boot", "100", "--device", "cpu"]
        proc = subprocess.run(cmd, check=False, env=ENV, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((out / "report.json").read_text()), proc

    full, _ = evaluate(1)
    records = sorted((out / "cases").glob("*.json"))
    assert len(records) == 6
    for path in records[1::2]:  # as if the run had been killed before these cases
        path.unlink()
    for name in ("report.json", "report.csv", "violin_dice.png", "expert_usage.png"):  # written at the end only
        (out / name).unlink(missing_ok=True)
    kept = {p: p.stat().st_mtime_ns for p in records[0::2]}
    resumed, proc = evaluate(2)
    assert "3 of 6 cases already done: skipped" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # not evaluated again
    assert resumed == full  # the merged records give the same report, bootstrap CIs included
