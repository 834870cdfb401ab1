"""Streamed 3D inference: float32 accumulators for a rolling slab of z planes, not for the whole volume.

Windows run in rows of equal z start (z slowest); all routers of a row run before the next row. Once a row is
done, every plane before the next row's start is final: its blended probabilities are normalised (the blending
weights of one plane are summed from MONAI's importance map on the spot, in the same order as the whole-volume
path), mapped back to the image grid and written into the float16 outputs with their labels; the routing maps
follow the same way, plane by plane, a few planes behind (their cells are coarser). The slab then moves on.
It holds ``roi_z + 2 * align`` planes: ``roi_z`` for one row of windows and ``2 * align`` behind it that the
coarse routing cells and the linear resize back to the image grid may still read. So the float32 working set
is set by the window depth and the plane size, not by the number of planes.
Resizing back to the image grid is split into a bilinear resize of each plane and a linear resize along z
(``routing_maps.LinearStream``, F.interpolate's own mapping): the same trilinear resize, done slab by slab.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Generator

import numpy as np
import torch

from napari_dmoe.inference.plan import Plan, Progress
from napari_dmoe.inference.routing import LinearStream, RoutingAccumulator, importance, shift_planes
from napari_dmoe.transforms import resize
from napari_dmoe.inference.volume_input import VolumeInput
from napari_dmoe.inference.windows import Counter, Window, batches, run_windows, window

VolumeResult = tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], "np.ndarray | None"]


def iter_volume(
    runner: Any,
    clock: Any,
    source: VolumeInput,
    plan: Plan,
    routers: list[int],
    n_classes: int,
    *,
    blend: str,
    sw_batch_size: int,
    want_routing: bool,
    keep_positions: Callable[[tuple[int, ...], int], bool],
) -> Generator[Progress, None, VolumeResult]:
    """Run every window of ``plan`` for every router; return float16 probabilities, labels, routing maps and
    the dominant expert on the image grid. ``keep_positions(map_shape, n_positions)`` decides (once) whether
    per-position routing maps are kept. The caller starts and stops ``runner``."""
    depth = min(plan.roi[0] + 2 * plan.align, plan.padded[0])
    # softmax sums to one, so the first class's blend is one minus the others': one float32 slab fewer
    slab = torch.zeros((n_classes - 1, depth, *plan.padded[1:]), dtype=torch.float32)
    routes = RoutingAccumulator(1, plan.padded, plan.roi, plan.align, blend, depth=depth)
    imp = importance(plan.roi, blend)
    weight = _PlaneWeights(plan, imp * len(routers))
    base = 0  # the padded z plane held at slab index 0

    def prob_plane(z: int) -> torch.Tensor:  # normalised blend of one final plane (reads ``base`` when called)
        rest = slab[:, z - base] / weight(z).clamp_min(1e-12)
        return torch.cat([(1 - rest.sum(0, keepdim=True)).clamp_min_(0), rest])

    out = _Outputs(plan, n_classes, keep_positions, prob_plane, routes)
    rows = [list(group) for _, group in itertools.groupby(plan.starts, key=lambda s: s[0])]
    # a batch never spans two rows (that would need a deeper slab), but may mix routers
    todo = [batches([Window(0, r, s) for r in routers for s in row], sw_batch_size) for row in rows]
    counter = Counter(sum(map(len, todo)))

    def add(w: Window, p: torch.Tensor) -> None:  # into the slab, whose first plane is ``base``
        slab[(slice(None), *window((w.start[0] - base, *w.start[1:]), plan.roi))] += p[1:] * imp

    for k, row_batches in enumerate(todo):
        yield from run_windows(runner, clock, row_batches, lambda w: source.window(w.start, plan.roi), add, routes,
                               want_routing, counter)
        if k + 1 < len(rows):
            final = rows[k + 1][0][0]  # later windows all start at or after this plane
            out.flush(final, clock)
            new_base = max(base, final - 2 * plan.align)
            shift_planes(slab, new_base - base)
            routes.advance(new_base)
            base = new_base
    yield Progress("postprocess", 0, 1)
    out.flush(plan.padded[0], clock)
    return out.result()


class _PlaneWeights:
    """Sum of the blending weights of every window (times the number of routers) over one z plane."""

    def __init__(self, plan: Plan, imp: torch.Tensor) -> None:
        self.plan, self.imp = plan, imp

    def __call__(self, z: int) -> torch.Tensor:
        plane = torch.zeros(self.plan.padded[1:], dtype=torch.float32)
        roi = self.plan.roi
        for s in self.plan.starts:  # the whole-volume path's order, so the sums are the same
            if s[0] <= z < s[0] + roi[0]:
                plane[window(s[1:], roi[1:])] += self.imp[z - s[0]]
        return plane


class _Outputs:
    """The float16/uint8 results on the image grid, filled plane by plane as the slab releases planes."""

    def __init__(self, plan: Plan, n_classes: int, keep_positions: Callable[[tuple[int, ...], int], bool],
                 prob_plane: Callable[[int], torch.Tensor], routes: RoutingAccumulator) -> None:
        self.plan, self.keep_positions, self.routes = plan, keep_positions, routes
        self.probabilities = np.empty((n_classes, *plan.image), dtype=np.float16)
        self.labels = np.empty(plan.image, dtype=np.uint8 if n_classes <= 255 else np.int32)
        self.probs = LinearStream(plan.work[0], plan.image[0], lambda z: _to_image(prob_plane(z), plan))
        self.chains: dict[str, _Chain] = {}
        self.maps: dict[str, np.ndarray] = {}
        self.mean: np.ndarray | None = None
        self.dominant: np.ndarray | None = None
        self.next_prob = self.next_route = 0

    def flush(self, final: int, clock: Any) -> None:
        """Write every image plane whose work planes before ``final`` are all done (all of them at the end)."""
        last, image_z = final >= self.plan.padded[0], self.plan.image[0]
        with clock("postprocess"):
            while self.next_prob < image_z and (last or self.probs.needs(self.next_prob) < final):
                j = self.next_prob
                torch.from_numpy(self.probabilities[:, j]).copy_(self.probs.get(j))
                self.labels[j] = np.argmax(self.probabilities[:, j], axis=0)  # of the stored float16, as 2D does
                self.next_prob += 1
        with clock("routing"):
            if not self.chains and self.routes.positions():
                self._start_routing()
            while self.chains and self.next_route < image_z and (
                last or all(c.ready(self.next_route, final) for c in self.chains.values())
            ):
                j, total = self.next_route, None
                for p, chain in self.chains.items():
                    plane = chain.image.get(j)
                    if p in self.maps:
                        torch.from_numpy(self.maps[p][:, j]).copy_(plane)
                    total = plane.clone() if total is None else total.add_(plane)
                torch.from_numpy(self.mean[:, j]).copy_(total.div_(len(self.chains)))
                self.dominant[j] = np.argmax(self.mean[:, j], axis=0)
                self.next_route += 1

    def _start_routing(self) -> None:
        """Once the positions are known: allocate the maps and one resize chain per position."""
        positions = self.routes.positions()
        shape = (self.routes.n_experts(positions[0]), *self.plan.image)
        if self.keep_positions(shape, len(positions)):
            self.maps = {p: np.empty(shape, dtype=np.float16) for p in positions}
        self.mean = np.empty(shape, dtype=np.float16)
        self.dominant = np.empty(self.plan.image, dtype=np.uint8)
        self.chains = {p: _Chain(self.routes, p, self.plan) for p in positions}

    def result(self) -> VolumeResult:
        maps = dict(self.maps)
        if self.mean is not None:
            maps["mean"] = self.mean
        return self.probabilities, self.labels, maps, self.dominant


class _Chain:
    """One position's map, pulled plane by plane: its coarse cells upsampled to the padded grid along z (as the
    whole-volume path upsamples them), each plane upsampled in y, x, cropped and resized to the image grid, then
    resized along z to the image grid."""

    def __init__(self, routes: RoutingAccumulator, position: str, plan: Plan) -> None:
        self.fz, self.fyx, self.plan = routes.factor[position][0], routes.factor[position][1:], plan
        n_cells = -(-plan.padded[0] // self.fz)
        self.cells = LinearStream(n_cells, n_cells * self.fz, lambda c: routes.cell_plane(position, c))
        self.image = LinearStream(plan.work[0], plan.image[0], self._plane)

    def _plane(self, z: int) -> torch.Tensor:
        cells = self.cells.get(z)
        padded = tuple(n * f for n, f in zip(cells.shape[1:], self.fyx))
        return _to_image(resize(cells[None], padded)[0], self.plan)

    def ready(self, j: int, final: int) -> bool:
        """Whether image plane ``j`` reads only cells of padded planes before ``final``."""
        return self.cells.needs(self.image.needs(j)) < final // self.fz


def _to_image(plane: torch.Tensor, plan: Plan) -> torch.Tensor:
    """``[K, *padded_yx]`` -> crop to the work grid, bilinear resize to the image grid of one plane."""
    plane = plane[(slice(None), *(slice(0, w) for w in plan.work[1:]))]
    return resize(plane[None], plan.image[1:])[0]
