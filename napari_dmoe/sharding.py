"""The cases of a batch across torchrun processes: ``dmoe segment --csv`` and ``dmoe evaluate`` run unchanged
under ``torchrun --nproc_per_node N`` (one GPU per process on GPUs, CPU processes with Gloo otherwise), with the
process group of training (``napari_dmoe.distributed``). Without torchrun it is the plain one-process loop.

- Sharding: rank 0 says which cases are left (a resumed run skips finished ones; one process looks, so ranks
  never disagree over a shared file system) and broadcasts it; rank r takes every N-th of them, round robin.
  Each case runs in exactly one process, so each output is written once.
- Rounds: after each round (one case per process) the counts are summed over the processes (all_reduce). That
  gives rank 0 the n/N counter and ETA and keeps every collective short: no process waits longer than one case,
  so a slow case never runs into the process group's timeout.
- Failures (``errors`` raised by one case: a bad file, an image the model refuses) are kept and gathered to rank
  0 for one summary; anything else is a bug and stops the run (torchrun then ends the other processes).
- Results (evaluate's per-case records) are gathered to rank 0 in case order: the same list one process makes.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO

__all__ = ["BatchOutcome", "processes", "run_batch"]


@contextmanager
def processes(device: str = "auto") -> Iterator[Any]:
    """The torchrun process group (none for one process) and this process's device, as training sets them up."""
    from napari_dmoe.distributed import cleanup, setup

    info = setup(device)
    try:
        yield info
    finally:
        cleanup(info)


@dataclass
class BatchOutcome:
    """What a batch did. ``failures`` (case index, message) and ``results`` (case index, value), both in case
    order, are complete on rank 0 only; the counts are the same on every rank (so is the exit code)."""

    total: int
    done: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    failures: list[tuple[int, str]] = field(default_factory=list)
    results: list[tuple[int, Any]] = field(default_factory=list)


class _Counter:
    """Rank 0's ``[n/N]`` line with rate and ETA, at most every ``every_s`` seconds (and at the end)."""

    def __init__(self, total: int, start: int, stream: TextIO | None, what: str, every_s: float) -> None:
        self.total, self.start, self.stream, self.what, self.every_s = total, start, stream, what, every_s
        self.t0 = self.last = time.perf_counter()

    def update(self, n: int, failed: int, final: bool = False) -> None:
        now = time.perf_counter()
        if self.stream is None or (not final and now - self.last < self.every_s):
            return
        self.last = now
        ran, left = n - self.start, self.total - n
        rate = ran / max(now - self.t0, 1e-9)
        eta = f", ETA {_clock(left / rate)}" if rate > 0 and left else ""
        bad = f", {failed} failed" if failed else ""
        print(f"[{n}/{self.total}] {self.what}: {rate:.3g}/s{eta}{bad} ({_clock(now - self.t0)} elapsed)",
              file=self.stream, flush=True)


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def run_batch(total: int, work: Callable[[int], Any], info: Any, *, done: Callable[[int], bool] | None = None,
              errors: tuple[type[BaseException], ...] = (ValueError, OSError), what: str = "cases",
              stream: TextIO | None = sys.stderr, every_s: float = 5.0) -> BatchOutcome:
    """Run ``work(i)`` for the cases ``i < total`` that are not ``done(i)`` (judged by rank 0), spread over the
    processes of ``info`` (a ``distributed.DistInfo``). ``stream``: rank 0's progress lines (None: quiet).
    """
    import torch.distributed as dist

    started = time.perf_counter()
    pending = [i for i in range(total) if done is None or not done(i)] if info.is_main else None
    if info.enabled:
        box = [pending]
        dist.broadcast_object_list(box, src=0)
        pending = box[0]
    out = BatchOutcome(total=total, skipped=total - len(pending))
    mine = pending[info.rank::info.world_size]
    counter = _Counter(total, out.skipped, stream if info.is_main else None, what, every_s)
    if info.is_main and out.skipped and stream is not None:
        print(f"{out.skipped} of {total} {what} already done: skipped", file=stream, flush=True)
    for r in range(math.ceil(len(pending) / info.world_size)):
        if r < len(mine):
            index = mine[r]
            try:
                out.results.append((index, work(index)))
                out.done += 1
            except errors as err:  # one bad case must not stop the batch; reported in the summary
                out.failures.append((index, " ".join(str(err).split()) or type(err).__name__))
                out.failed += 1
        n_done, n_failed = _sum_over_ranks([out.done, out.failed], info)
        counter.update(out.skipped + n_done + n_failed, n_failed)
    n_done, n_failed = _sum_over_ranks([out.done, out.failed], info)
    out.done, out.failed = n_done, n_failed
    counter.update(out.skipped + n_done + n_failed, n_failed, final=bool(pending))
    if info.enabled:
        gathered = [None] * info.world_size if info.is_main else None
        dist.gather_object((out.results, out.failures), gathered, dst=0)
        if info.is_main:
            out.results = sorted((r for g in gathered for r in g[0]), key=lambda r: r[0])
            out.failures = sorted((f for g in gathered for f in g[1]), key=lambda f: f[0])
        else:
            out.results, out.failures = [], []
    out.seconds = time.perf_counter() - started
    return out


def _sum_over_ranks(values: Sequence[int], info: Any) -> list[int]:
    if not info.enabled:
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.int64, device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return [int(v) for v in t.tolist()]
