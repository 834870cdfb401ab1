"""How many CPU threads torch may use: chosen from the cores this process may really use and how busy they are.

torch's default is one intra-op thread per core of the machine. On a shared machine that is too many: a thread on
a core another process keeps busy makes every parallel region wait for it (OpenMP threads spin at the end of each
region), and a training step on 2 cores beside one busy process took 2.4x as long with torch's 2 threads as with
one (BENCHMARKS.md, "Threads on a busy machine"). The rule, in order:

1. ``--threads N`` (every ``dmoe`` command), else ``DMOE_THREADS=N``: exactly N.
2. ``OMP_NUM_THREADS=N`` (what torch itself honours; torchrun sets it to 1 for several processes): N.
3. Otherwise ("auto", also ``--threads auto``): the usable cores (CPU affinity, capped by the cgroup CPU quota of a
   container or batch job, shared among the torchrun processes of this machine), minus the cores other processes
   keep busy (sampled from ``/proc/stat``, else the 1-minute load average), minus ``DMOE_THREADS_RESERVE`` cores
   kept free (the napari fine-tune sets 1, for the viewer), and never more than torch's own default; at least 1.
   A core counts as free when it is at least ``FREE_FRACTION`` idle: one thread too many costs far more than one
   too few.

``apply_threads`` is called once per process by the front ends (``dmoe``'s main for every command); the engines
leave the setting alone and report it (``describe_current``), so a Python caller's ``torch.set_num_threads`` wins.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

ENV_THREADS = "DMOE_THREADS"
ENV_RESERVE = "DMOE_THREADS_RESERVE"
FREE_FRACTION = 0.75  # a core must be this idle to get a thread
SAMPLE_S = 0.1  # shortest /proc/stat interval (10 clock ticks per core)


class ThreadsError(ValueError):
    """A thread count that is not a positive integer or 'auto'; the message names where it came from."""


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    source: str  # "--threads", "DMOE_THREADS", "OMP_NUM_THREADS", "auto" or "caller"
    reason: str

    def line(self) -> str:
        return f"{self.threads} CPU thread{'s' * (self.threads != 1)} ({self.source}: {self.reason})"


@dataclass(frozen=True)
class CpuSample:
    """Per-CPU (busy, total) clock ticks from /proc/stat, this process's CPU seconds, and the wall clock."""

    ticks: Mapping[int, tuple[int, int]]
    own_s: float
    wall: float


def parse_count(value: str | int | None, where: str) -> int | None:
    """``value`` as a thread count; None for unset or "auto"."""
    if value is None or str(value).strip().lower() in ("", "auto"):
        return None
    try:
        n = int(str(value).strip())
    except ValueError:
        n = 0
    if n < 1:
        raise ThreadsError(f"{where}={value!r} is not a thread count: give a positive integer or 'auto'")
    return n


def parse_stat(text: str) -> dict[int, tuple[int, int]]:
    """``/proc/stat`` text -> {cpu: (busy ticks, total ticks)}; idle and iowait are not busy, steal is."""
    out = {}
    for line in text.splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit():
            continue
        values = [int(v) for v in fields[:8]] + [0] * (8 - len(fields[:8]))
        total = sum(values)  # guest time is already inside user
        out[int(name[3:])] = (total - values[3] - values[4], total)
    return out


def sample(stat: str | Path = "/proc/stat") -> CpuSample | None:
    """A CpuSample now, or None where there is no /proc/stat (macOS, Windows)."""
    try:
        ticks = parse_stat(Path(stat).read_text())
    except OSError:
        return None
    times = os.times()
    return CpuSample(ticks, times.user + times.system, time.monotonic())


def busy_between(a: CpuSample, b: CpuSample, cpus: set[int]) -> float:
    """Cores of ``cpus`` kept busy by OTHER processes between two samples (this process's own CPU time, e.g. while
    it imports torch, is taken off)."""
    busy = 0.0
    for cpu in cpus:
        if cpu in a.ticks and cpu in b.ticks:
            d_busy, d_total = b.ticks[cpu][0] - a.ticks[cpu][0], b.ticks[cpu][1] - a.ticks[cpu][1]
            busy += d_busy / d_total if d_total > 0 else 0.0
    own = (b.own_s - a.own_s) / max(b.wall - a.wall, 1e-6)
    return max(0.0, busy - own)


def usable_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity; every CPU where the OS does not say)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def cgroup_cpu_limit(root: str | Path = "/sys/fs/cgroup", self_cgroup: str | Path = "/proc/self/cgroup") -> float | None:
    """The CPU quota of this process's cgroup in cores (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us``; the smallest along the path to the root), None when there is none."""
    root = Path(root)
    try:
        lines = Path(self_cgroup).read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        controllers, path = parts[1].split(","), parts[2].strip("/")
        if parts[1] == "":  # v2
            mounts = [root, root / "unified"]
        elif "cpu" in controllers:  # v1: mounted as cpu, cpu,cpuacct or cpuacct,cpu
            mounts = [root / parts[1], root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu"]
        else:
            continue
        for mount in dict.fromkeys(mounts):
            folder = mount / path if path else mount
            for level in [folder, *folder.parents]:
                limit = _read_limit(level)
                if limit is not None:
                    limits.append(limit)
                if level == mount:
                    break
    return min(limits) if limits else None


def _read_limit(folder: Path) -> float | None:
    try:
        if (folder / "cpu.max").is_file():
            quota, period = ((folder / "cpu.max").read_text().split() + ["100000"])[:2]
            return None if quota == "max" else int(quota) / int(period)
        if (folder / "cpu.cfs_quota_us").is_file():
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
            return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None
    return None


def choose_threads(requested: str | int | None = None, *, env: Mapping[str, str], cpus: int,
                   quota: float | None, busy: float | None, ceiling: int | None = None) -> ThreadChoice:
    """The rule of the module docstring on given facts: ``cpus`` in the affinity, cgroup ``quota`` in cores,
    ``busy`` cores used by other processes (None: unknown), ``ceiling`` torch's own default."""
    for value, where in ((requested, "--threads"), (env.get(ENV_THREADS), ENV_THREADS)):
        n = parse_count(value, where)
        if n is not None:
            return ThreadChoice(n, where, "as asked")
        if value is not None and str(value).strip():  # "auto" said explicitly: the rule, not OMP_NUM_THREADS
            break
    else:
        omp = env.get("OMP_NUM_THREADS", "").strip()
        if omp.isdigit() and int(omp) > 0:
            return ThreadChoice(int(omp), "OMP_NUM_THREADS", "set in the environment")
    raw = env.get(ENV_RESERVE, "").strip()
    reserve = 0 if raw in ("", "0") else parse_count(raw, ENV_RESERVE) or 0
    local = max(1, int(env.get("LOCAL_WORLD_SIZE", "1") or 1))
    usable = cpus if quota is None else min(cpus, max(1, math.floor(quota + 1e-6)))
    why = [f"{cpus} CPU{'s' * (cpus != 1)} in the affinity"
           + ("" if quota is None else f", cgroup quota {quota:g} cores")]
    n = usable
    if busy is not None:
        free = max(0.0, cpus - busy)
        n = min(n, math.floor(free + 1 - FREE_FRACTION))
        why.append(f"{busy:.1f} busy with other work")
    if local > 1:
        n, why = n // local, why + [f"shared by {local} processes"]
    if reserve:
        n, why = min(n, usable - reserve), why + [f"{reserve} kept free ({ENV_RESERVE})"]
    if ceiling is not None and n > ceiling:
        n, why = ceiling, why + [f"torch's default {ceiling}"]
    return ThreadChoice(max(1, n), "auto", ", ".join(why))


# torch's thread setting is process-wide, so what was chosen for it is too
_applied: ThreadChoice | None = None  # what apply_threads last set
_torch_default: int | None = None  # torch.get_num_threads() before the first apply_threads


def apply_threads(requested: str | int | None = None, *, since: CpuSample | None = None,
                  env: Mapping[str, str] | None = None) -> ThreadChoice:
    """Choose (``choose_threads`` on this machine's facts) and ``torch.set_num_threads``; return the choice.

    ``since``: a ``sample()`` taken earlier (e.g. before importing torch), so the load is measured over that
    interval at no extra wait; otherwise this waits ``SAMPLE_S``."""
    global _applied, _torch_default
    env = os.environ if env is None else env
    import torch

    if _torch_default is None:
        _torch_default = torch.get_num_threads()
    needs_load = not any(str(v or "").strip() not in ("", "auto") for v in (requested, env.get(ENV_THREADS)))
    busy = measure_busy(since) if needs_load else None
    cpus = usable_cpus()
    choice = choose_threads(requested, env=env, cpus=len(cpus), quota=cgroup_cpu_limit(), busy=busy,
                            ceiling=_torch_default)
    torch.set_num_threads(choice.threads)
    _applied = choice
    return choice


def measure_busy(since: CpuSample | None = None) -> float | None:
    """Cores of this process's affinity busy with other work since ``since`` (at least ``SAMPLE_S``); the 1-minute
    load average where /proc/stat is missing; None where neither exists."""
    first = since or sample()
    if first is None:
        if hasattr(os, "getloadavg"):
            return min(float(os.cpu_count() or 1), os.getloadavg()[0])
        return None
    wait = SAMPLE_S - (time.monotonic() - first.wall)
    if wait > 0:
        time.sleep(wait)
    second = sample()
    return None if second is None else busy_between(first, second, usable_cpus())


def describe_current() -> ThreadChoice:
    """The thread setting in effect: the choice ``apply_threads`` made, or what the caller (or torch) set."""
    import torch

    n = torch.get_num_threads()
    if _applied is not None and _applied.threads == n:
        return _applied
    return ThreadChoice(n, "caller", "set by the calling program or torch's default")
