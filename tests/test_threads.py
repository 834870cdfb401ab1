"""The CPU thread rule (napari_dmoe.threads) on made-up machines, and `--threads` through a real `dmoe train`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from napari_dmoe.finetune.process import TrainingProcess
from napari_dmoe.threads import (ENV_RESERVE, ENV_THREADS, CpuSample, ThreadsError, busy_between, cgroup_cpu_limit,
                                 choose_threads, parse_stat)
from training_data import tiny_config, write_fairseg

STAT = """cpu  300 0 100 500 20 0 0 0 0 0
cpu0 100 0 50 200 10 0 0 0 0 0
cpu1 200 0 50 300 10 0 0 0 0 0
intr 1 2 3
"""


def test_parse_stat_counts_idle_and_iowait_as_free():
    assert parse_stat(STAT) == {0: (150, 360), 1: (250, 560)}


def test_busy_between_takes_this_process_off():
    a = CpuSample({0: (0, 0), 1: (0, 0), 2: (0, 0)}, own_s=0.0, wall=0.0)
    # over 1 s: cpu0 fully busy, cpu1 half, cpu2 idle; this process used 0.5 s of CPU itself
    b = CpuSample({0: (100, 100), 1: (50, 100), 2: (0, 100)}, own_s=0.5, wall=1.0)
    assert busy_between(a, b, {0, 1, 2}) == pytest.approx(1.0)
    assert busy_between(a, b, {1, 2}) == pytest.approx(0.0)  # only the CPUs we may use count; never negative
    assert busy_between(a, b, {0}) == pytest.approx(0.5)


def _cgroup(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "self_cgroup"
    path.write_text(text)
    return path


def test_cgroup_v2_quota_smallest_along_the_path(tmp_path):
    root = tmp_path / "fs"
    (root / "user.slice" / "job").mkdir(parents=True)
    (root / "user.slice" / "job" / "cpu.max").write_text("max 100000\n")
    (root / "user.slice" / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(root, _cgroup(tmp_path, "0::/user.slice/job\n")) == pytest.approx(1.5)
    (root / "user.slice" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(root, _cgroup(tmp_path, "0::/user.slice/job\n")) is None


def test_cgroup_v1_cfs_quota(tmp_path):
    root = tmp_path / "fs"
    leaf = root / "cpu,cpuacct" / "docker" / "abc"
    leaf.mkdir(parents=True)
    (leaf / "cpu.cfs_quota_us").write_text("-1\n")
    (leaf / "cpu.cfs_period_us").write_text("100000\n")
    (root / "cpu,cpuacct" / "docker" / "cpu.cfs_quota_us").write_text("200000\n")
    (root / "cpu,cpuacct" / "docker" / "cpu.cfs_period_us").write_text("100000\n")
    text = "4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n"
    assert cgroup_cpu_limit(root, _cgroup(tmp_path, text)) == pytest.approx(2.0)
    assert cgroup_cpu_limit(root, tmp_path / "missing") is None


def choose(env=None, requested=None, **facts):
    facts = {"cpus": 2, "quota": None, "busy": 0.0, "ceiling": None, **facts}
    return choose_threads(requested, env=env or {}, **facts)


def test_explicit_counts_win_in_order():
    env = {ENV_THREADS: "3", "OMP_NUM_THREADS": "5"}
    assert (choose(env, "2").threads, choose(env, "2").source) == (2, "--threads")
    assert (choose(env).threads, choose(env).source) == (3, ENV_THREADS)
    assert (choose({"OMP_NUM_THREADS": "5"}).threads, choose({"OMP_NUM_THREADS": "5"}).source) == (5, "OMP_NUM_THREADS")
    # "auto" said on purpose chooses by the rule even where OMP_NUM_THREADS is set
    auto = choose({"OMP_NUM_THREADS": "5"}, "auto", cpus=4, busy=1.0)
    assert (auto.threads, auto.source) == (3, "auto")
    assert choose({ENV_THREADS: "auto", "OMP_NUM_THREADS": "5"}, cpus=4).source == "auto"


@pytest.mark.parametrize("requested, env, where", [("0", {}, "--threads"), ("two", {}, "--threads"),
                                                   (None, {ENV_THREADS: "-1"}, ENV_THREADS),
                                                   (None, {ENV_RESERVE: "x"}, ENV_RESERVE)])
def test_bad_counts_are_refused_naming_the_source(requested, env, where):
    with pytest.raises(ThreadsError, match=where):
        choose(env, requested)


@pytest.mark.parametrize("facts, expected", [
    ({"cpus": 2, "busy": 0.0}, 2),            # a quiet machine: every core
    ({"cpus": 2, "busy": 1.0}, 1),            # one busy process beside us: one thread
    ({"cpus": 2, "busy": 2.0}, 1),            # everything busy: still one
    ({"cpus": 2, "busy": 0.2}, 2),            # a core 80% idle counts as free ...
    ({"cpus": 2, "busy": 0.3}, 1),            # ... one 70% idle does not
    ({"cpus": 16, "quota": 2.5, "busy": 0.0}, 2),   # a container's quota, not the host's cores
    ({"cpus": 16, "quota": 0.5, "busy": 0.0}, 1),
    ({"cpus": 8, "busy": 0.0, "ceiling": 4}, 4),    # never more than torch's own default
    ({"cpus": 4, "busy": None}, 4),           # load unknown (no /proc/stat, no load average)
])
def test_auto_rule(facts, expected):
    choice = choose(**facts)
    assert choice.threads == expected and choice.source == "auto", choice


def test_auto_keeps_cores_for_the_gui_and_shares_with_torchrun_peers():
    assert choose({ENV_RESERVE: "1"}, cpus=2, busy=0.0).threads == 1
    assert choose({ENV_RESERVE: "1"}, cpus=8, busy=0.0).threads == 7
    assert choose({ENV_RESERVE: "1"}, cpus=1, busy=0.0).threads == 1  # at least one, always
    shared = choose({"LOCAL_WORLD_SIZE": "4"}, cpus=8, busy=0.0)
    assert shared.threads == 2 and "shared by 4 processes" in shared.reason
    line = choose({ENV_RESERVE: "1"}, cpus=4, quota=3.0, busy=1.0).line()
    assert line.startswith("2 CPU threads (auto: 4 CPUs in the affinity, cgroup quota 3 cores, 1.0 busy"), line


def test_napari_finetune_child_keeps_a_core_free(tmp_path):
    process = TrainingProcess([sys.executable, "-c", f"import os; print(os.environ.get({ENV_RESERVE!r}))"],
                              tmp_path)
    process.start()
    process.proc.wait(60)
    assert process.stdout_path.read_text().strip() == "1"


@pytest.mark.slow
def test_dmoe_train_threads_option_is_honoured_and_logged(tmp_path):
    root = write_fairseg(tmp_path / "fairseg", n_train=4, n_test=2)
    data = {"format": "fairseg", "root": str(root), "attributes": "race", "crop": None}
    cfg = tiny_config(tmp_path / "c.yaml", tmp_path / "run", data, recipe={"steps": 1, "batch_size": 2,
                                                                             "val_every": 1})
    # without the option the environment would ask for 2 threads (and OMP_NUM_THREADS would say 1)
    env = {**{k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}, ENV_THREADS: "2"}
    proc = subprocess.run([sys.executable, "-m", "napari_dmoe.cli.main", "train", str(cfg), "--events", "-",
                           "--device", "cpu", "--threads", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "dmoe train: 1 CPU thread (--threads: as asked)" in proc.stderr
    start = json.loads(proc.stdout.splitlines()[0])
    # read back from torch inside the training process, when the run started
    assert start["event"] == "start" and start["threads"] == 1
    assert start["threads_reason"] == "--threads: as asked"

    bad = subprocess.run([sys.executable, "-m", "napari_dmoe.cli.main", "train", str(cfg), "--threads", "many"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "dmoe train: error: --threads='many' is not a thread count: give a positive integer or 'auto'"]


def test_apply_sets_torch_and_describe_reports_it():
    import torch

    from napari_dmoe.threads import apply_threads, describe_current

    before = torch.get_num_threads()
    try:
        choice = apply_threads("1", env={"OMP_NUM_THREADS": "2"})
        assert torch.get_num_threads() == 1 and describe_current() == choice and choice.source == "--threads"
        torch.set_num_threads(2 if before != 2 else 3)  # a Python caller's own setting is reported as such
        assert describe_current().source == "caller"
    finally:
        torch.set_num_threads(before)


def test_the_segment_widgets_job_follows_the_same_rule(model_path, monkeypatch):
    """Inference inside napari (the Segment widget's worker) sets torch's threads by the rule of every verb."""
    import numpy as np
    import torch

    from napari_dmoe.generators import drain
    from napari_dmoe.inference.request import SegmentRequest
    from napari_dmoe.plugin.widgets.jobs import ModelCache, run_sweep
    from napari_dmoe.threads import describe_current

    monkeypatch.setenv(ENV_THREADS, "1")
    torch.set_num_threads(2)
    result = drain(run_sweep(str(model_path), SegmentRequest(np.zeros((32, 32), np.float32), force=True),
                             ModelCache(), [{"race": "Black"}]))
    assert result.error is None and list(result.segmentations) == ["race=Black"]
    assert torch.get_num_threads() == 1 and describe_current().source == ENV_THREADS
