"""The one sliding-window loop, used by the whole-image path (``engine``) and the streamed 3D path (``volume``).

MONAI's ``sliding_window_inference`` calls the predictor synchronously, so a generator cannot yield from inside
it and routing records could not be tied to window positions; the windows are therefore laid out by
``plan.make_plan`` (MONAI's scan) and run here, batch by batch, blended with MONAI's importance map. A test
checks the result against ``sliding_window_inference``. The callers differ only in where a window's input comes
from (``read``) and where its probabilities go (``add``).
"""
from __future__ import annotations

from typing import Any, Callable, Generator, NamedTuple, Sequence

import torch

from napari_dmoe.inference.plan import Progress
from napari_dmoe.inference.routing import RoutingAccumulator


class Window(NamedTuple):
    """One window run: ``plane`` of a stack of slices (0 for one image or volume), ``router``, ``start``."""

    plane: int
    router: int
    start: tuple[int, ...]


def window(start: Sequence[int], roi: Sequence[int]) -> tuple[slice, ...]:
    """The slices of the window of size ``roi`` at ``start``."""
    return tuple(slice(s, s + r) for s, r in zip(start, roi))


def batches(windows: Sequence[Window], size: int) -> list[list[Window]]:
    """``windows`` in order, ``size`` at a time."""
    return [list(windows[i : i + size]) for i in range(0, len(windows), size)]


class Counter:
    """Batches done of all batches of a run (a run may call ``run_windows`` once per row)."""

    def __init__(self, total: int) -> None:
        self.done, self.total = 0, total


def run_windows(
    runner: Any,
    clock: Any,
    todo: Sequence[Sequence[Window]],
    read: Callable[[Window], torch.Tensor],
    add: Callable[[Window, torch.Tensor], None],
    routes: RoutingAccumulator,
    want_routing: bool,
    counter: Counter,
) -> Generator[Progress, None, None]:
    """Run each batch of windows through ``runner`` and blend the results; yield progress after each batch.

    ``read(w)``: the input ``[C, *roi]`` of window ``w``; ``add(w, p)``: blend its probabilities ``[K, *roi]``.
    The gate weights of each dMoE position go to ``routes`` (``routes.add(position, plane, start, weights)``).
    """
    for batch in todo:
        with clock("infer"):
            x = torch.stack([read(w) for w in batch])
            p, records = runner.predict(x, [w.router for w in batch], want_routing)
            for b, w in enumerate(batch):
                add(w, p[b])
        with clock("routing"):
            for position, weights in records.items():
                for b, w in enumerate(batch):
                    routes.add(position, w.plane, w.start, weights[b])
        counter.done += 1
        yield Progress("infer", counter.done, counter.total)
