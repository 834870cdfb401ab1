"""Each benchmark script's --quick mode runs in a fresh process and ends with its ``key=value`` summary line."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses or real training: over ~5 s each

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run(cmd: list[str], timeout: int = 180, **extra_env: str) -> list[str]:
    # the machine is shared: one thread is enough for a smoke test; PYTHON: gpu.sh uses this interpreter, whose
    # environment has torch, whether or not a virtual environment is activated
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable, **extra_env)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=BENCH.parent, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert lines, "no output"
    return lines


def _pairs(line: str) -> dict[str, str]:
    pairs = dict(part.split("=", 1) for part in line.split())
    assert all(key and value for key, value in pairs.items()), line
    return pairs


@pytest.mark.parametrize(
    "script, keys",
    [
        ("bench_inference.py", {"bench", "2d_total_s", "3d_total_s", "3d_goal_met"}),
        ("bench_memory.py", {"bench", "small_beyond_mib", "large_beyond_mib", "ratio", "goal_met"}),
        ("bench_moe_layer.py", {"bench", "device", "vit64_ours_ms"}),
    ],
)
def test_quick_mode_prints_a_summary_line(script, keys):
    lines = _run([sys.executable, str(BENCH / script), "--quick"])
    summary = _pairs(lines[-1])
    assert keys <= set(summary), f"missing {keys - set(summary)} in {lines[-1]}"
    assert len(lines) > 3, "expected a table before the summary line"


def test_flops_quick_mode_prints_consistent_figures():
    summary = _pairs(_run([sys.executable, str(BENCH / "bench_flops.py"), "--quick"])[-1])
    assert summary["bench"] == "flops" and "3d_dmoe_vs_pergroup_params" in summary
    base, dmoe = float(summary["2d_base_params_m"]), float(summary["2d_dmoe_params_m"])
    per_group = float(summary["2d_pergroup_params_m"])
    # experts and routers add parameters; three separate models triple the baseline
    assert base < dmoe and per_group == pytest.approx(3 * base, rel=1e-3)
    assert float(summary["2d_dmoe_gflops"]) > float(summary["2d_base_gflops"]) > 0


@pytest.mark.skipif(shutil.which("bash") is None, reason="gpu.sh is a bash script")
def test_gpu_script_runs_on_cpu_in_quick_mode(tmp_path):
    results = tmp_path / "gpu_results.txt"
    lines = _run(["bash", str(BENCH / "gpu.sh"), "--device", "cpu", "--quick"], timeout=300,
                 GPU_RESULTS=str(results))
    summaries = [line for line in lines if line.startswith("bench=")]
    assert any(line.startswith("bench=gpu") for line in summaries), lines[-10:]
    assert "card=CPU" in next(line for line in summaries if line.startswith("bench=gpu"))
    assert "bench=gpu" in results.read_text()  # the log file holds the figures too
