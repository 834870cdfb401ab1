"""The one inference engine: preprocessing, sliding window, device/AMP, routing maps.

``iter_segment`` is a generator that yields ``Progress`` between windows and returns a ``Segmentation``;
``segment`` drains it. Closing the generator (``gen.close()``) stops between two window batches and puts the
network back where it was.

Geometry rules:
- 2D model: by default the whole image is resized to ``spec.input_size`` (FairSeg style) and the probabilities
  are resized back. When ``spec.spacing`` is set and the image, at the model's pixel size, is more than twice
  ``input_size`` along some axis, it is resampled to ``spec.spacing`` and scanned with windows of ``input_size``
  instead (``mode2d`` forces either). A 2D model on a volume segments it slice by slice.
- 3D model: the volume is resampled to ``spec.spacing`` when both spacings are known, padded at the end to
  multiples of 32 and at least 64 per axis (the 3D UNet's limits), scanned with windows of ``roi_size``
  (default ``spec.input_size``, shrunk to the padded volume) and mapped back to the original grid.
- Windows: laid out by ``plan.make_plan`` (MONAI's scan, interval rounded to a multiple of 4 for the routing
  maps) and run by the one loop in ``windows.py`` (why not MONAI's ``sliding_window_inference``: see there), for
  both this whole-image path and the streamed 3D path; blended with MONAI's ``compute_importance_map``.
- Probabilities are blended (MONAI importance maps) and averaged across routers when the attribute is unknown;
  labels are the argmax of the stored (float16) probabilities.
- Memory: results are written straight into their float16/uint8 output arrays one class (or expert) and plane at
  a time, so the float32 temporaries stay the size of one image; the input stack is dropped once it is on the
  work grid. Per-position routing maps cost E x 2 bytes per voxel each: ``routing="auto"`` keeps them only while
  they fit ``AUTO_ALL_BYTES`` (the mean map and dominant expert are always kept), ``"all"`` always, ``"mean"`` never.
- 3D models stream (``volume.py``): windows run in rows of equal z start, the float32 accumulators
  cover only a slab of ``roi_z + 8`` planes, finished planes go straight to the outputs, and each window's input
  is made from the raw image (``volume_input.py``), so no float32 copy of the whole volume is ever made.
  2D models (and stacks of slices) use the whole-image path below, as does 3D with ``STREAM_3D = False``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Sequence

import numpy as np
import torch

from napari_dmoe.devices import DeviceError, resolve_device
from napari_dmoe.generators import drain
from napari_dmoe.inference.plan import (
    InferenceError, Plan, Progress, check_image, make_plan, prepare_image,
)
from napari_dmoe.model.routers import AttributeValueError, resolve_routers
from napari_dmoe.inference.runner import Runner
from napari_dmoe.inference.volume import VolumeResult, iter_volume
from napari_dmoe.inference.routing import RoutingAccumulator, importance
from napari_dmoe.inference.scale import check_zoom, zoom_back, zoom_image
from napari_dmoe.transforms import resize
from napari_dmoe.inference.volume_input import VolumeInput
from napari_dmoe.inference.windows import Counter, Window, batches, run_windows, window

__all__ = ["InferenceError", "Progress", "Segmentation", "iter_segment", "segment"]

AUTO_ALL_BYTES = 256 * 2**20  # routing="auto" keeps per-position maps while they take at most this
ROUTING_MODES = ("auto", "all", "mean", "none")
# 3D models stream (volume.py); False runs them through the whole-volume path below, the reference
# the tests compare the streamed results with
STREAM_3D = True


@dataclass
class Segmentation:
    """Result on the input image grid. ``routing`` is empty (and ``dominant_expert`` None) without MoE.
    ``attribute``: name -> value the routers used, e.g. {"race": "unknown (averaged over 3 values)"}; shown to
    people only through ``plan.attribute_text``."""

    labels: np.ndarray
    probabilities: np.ndarray
    routing: dict[str, np.ndarray]
    dominant_expert: np.ndarray | None
    attribute: dict[str, str]
    timings: dict[str, float]
    device: str
    warnings: list[str] = field(default_factory=list)
    conversions: list[str] = field(default_factory=list)
    device_reason: str = ""


def segment(model: Any, image: np.ndarray, attribute: Any = None, **kwargs: Any) -> Segmentation:
    """Segment ``image`` with ``model`` (see ``iter_segment`` for the options) and return the result."""
    return drain(iter_segment(model, image, attribute, **kwargs))


def iter_segment(
    model: Any,
    image: np.ndarray,
    attribute: Any = None,
    *,
    spacing: Sequence[float] | None = None,
    device: str = "auto",
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 4,
    blend: str = "gaussian",
    amp: bool = True,
    routing: bool | str = True,
    unknown: str = "average",
    rgb: bool | None = None,
    mode2d: str = "auto",
    channels_last: bool = False,
    compile: bool = False,
    zoom: float = 1.0,
) -> Generator[Progress, None, Segmentation]:
    """Yield progress while segmenting; return a Segmentation.

    ``image``: (y, x), (y, x, 3|4) colour, (z, y, x) or (z, y, x, 3|4); ``spacing`` per spatial axis in the
    same order. ``attribute``: a value (one-attribute model), a dict name -> value, or None / "unknown" to
    average over all routers (``unknown="error"`` refuses instead). ``rgb``: None guesses from the last axis.
    ``routing``: ``True``/"auto", "all", "mean" (only the mean map over positions) or ``False``/"none".
    ``channels_last`` / ``compile``: speed options for GPUs, see ``runner``; a compile that fails or
    disagrees with the eager network falls back to it with a warning. ``zoom`` (2D models): the site calibration
    of ``inference.scale``, the image zoomed about its centre before the model and the results mapped back.
    """
    routing_mode = _routing_mode(routing)
    _check_options(overlap, sw_batch_size, blend)
    spec, n_classes = model.spec, model.spec.n_classes
    zoom = check_zoom(zoom, spec.spatial_dims)
    if zoom != 1.0:
        image, _, rgb, _ = check_image(spec, image, spacing, rgb)
        image = zoom_image(image, zoom, rgb)
    clock = _Clock()
    with clock("preprocess"):
        prep = _prepare(spec, image, attribute, spacing, rgb, device, roi_size, overlap, mode2d, unknown)
    yield Progress("preprocess", 1, 1)

    plan, warns = prep.plan, prep.warnings
    runner = Runner(model.network, prep.device, amp, sw_batch_size, warns, channels_last=channels_last,
                    compile=compile)
    want_routing = routing_mode != "none" and spec.routing != "none"
    runner.start()
    try:
        if prep.source is not None:  # streamed 3D: blends, maps back and writes the outputs as it goes
            full, labels, maps, dominant = yield from iter_volume(
                runner, clock, prep.source, plan, prep.routers, n_classes, blend=blend, sw_batch_size=sw_batch_size,
                want_routing=want_routing, keep_positions=_keep_positions(routing_mode, warns),
            )
        else:
            blended = yield from _run_whole(runner, clock, prep, n_classes, blend, sw_batch_size, want_routing)
    finally:
        runner.stop()
    if prep.source is None:
        yield Progress("postprocess", 0, 1)
        full, labels, maps, dominant = _finish_whole(clock, *blended, plan, n_classes, want_routing, routing_mode,
                                                     warns)
    result = Segmentation(labels=labels, probabilities=full, routing=maps, dominant_expert=dominant,
                          attribute=prep.used, timings=clock.seconds, device=str(prep.device), warnings=warns,
                          conversions=prep.notes, device_reason=prep.reason)
    return result if zoom == 1.0 else zoom_back(result, zoom)


def _check_options(overlap: float, sw_batch_size: int, blend: str) -> None:
    if not 0 <= overlap < 1:
        raise InferenceError(f"overlap={overlap} must be in [0, 1)")
    if sw_batch_size < 1:
        raise InferenceError(f"sw_batch_size={sw_batch_size} must be at least 1")
    if blend not in ("gaussian", "constant"):
        raise InferenceError(f"blend={blend!r}: expected 'gaussian' or 'constant'")


@dataclass
class _Prepared:
    """Everything decided before the first window: routers, device, plan and the input (``source`` for streamed
    3D, else ``work``: the whole stack on the padded work grid)."""

    routers: list[int]
    used: dict[str, str]
    device: torch.device
    reason: str
    plan: Plan
    notes: list[str]
    warnings: list[str]
    source: VolumeInput | None = None
    work: torch.Tensor | None = None


def _prepare(spec: Any, image: Any, attribute: Any, spacing: Sequence[float] | None, rgb: bool | None, device: str,
             roi_size: Sequence[int] | None, overlap: float, mode2d: str, unknown: str) -> _Prepared:
    try:
        routers, used, routing_note = resolve_routers(spec, attribute, unknown)
    except AttributeValueError as err:
        raise InferenceError(str(err)) from None
    try:
        dev, reason = resolve_device(device)
    except DeviceError as err:
        raise InferenceError(str(err)) from None
    if spec.spatial_dims == 3 and STREAM_3D:
        image, shape, is_rgb, image_spacing = check_image(spec, image, spacing, rgb)
        plan = make_plan(spec, shape, image_spacing, roi_size, overlap, mode2d)
        source = VolumeInput(spec, image, is_rgb, plan)  # windows made on demand from the raw image
        prep = _Prepared(routers, used, dev, reason, plan, source.notes, source.warnings, source=source)
    else:
        stack, image_spacing, squeeze, notes, warns = prepare_image(spec, image, spacing, rgb)
        plan = make_plan(spec, stack.shape[2:], image_spacing, roi_size, overlap, mode2d, squeeze)
        prep = _Prepared(routers, used, dev, reason, plan, notes, warns, work=_to_work_grid(stack, plan))
    if spec.spatial_dims == 3 and spec.spacing is not None and image_spacing is None:
        prep.warnings.append(f"the voxel size of this volume is unknown: it was used as it is, while the model "
                             f"expects {'x'.join(f'{s:g}' for s in spec.spacing)} mm voxels; give the spacing (or "
                             "open a NIfTI/DICOM file) for a correct result")
    if routing_note:
        prep.warnings.append(routing_note)
    return prep


def _run_whole(runner: Runner, clock: "_Clock", prep: _Prepared, n_classes: int, blend: str, sw_batch_size: int,
               want_routing: bool) -> Generator[Progress, None, tuple[torch.Tensor, torch.Tensor, RoutingAccumulator]]:
    """Every window of every plane and router, blended: probability sums and weights on the padded work grid.
    Batches never mix routers here (one router's pass over the stack after the other)."""
    plan, work, routers = prep.plan, prep.work, prep.routers
    probs = torch.zeros((work.shape[0], n_classes, *plan.padded), dtype=torch.float32)
    weight = torch.zeros((1, *plan.padded), dtype=torch.float32)
    if len(plan.starts) == 1:  # one window (a 2D image resized to the model): blending weights cancel out, and the
        blend = "constant"     # gaussian ones would import MONAI, seconds of the first mask
    imp = importance(plan.roi, blend)
    for start in plan.starts:
        weight[(slice(None), *window(start, plan.roi))] += imp * len(routers)
    routes = RoutingAccumulator(work.shape[0], plan.padded, plan.roi, plan.align, blend)
    per_router = [batches([Window(z, r, s) for z in range(work.shape[0]) for s in plan.starts], sw_batch_size)
                  for r in routers]
    todo = [b for router_batches in per_router for b in router_batches]

    def read(w: Window) -> torch.Tensor:
        return work[(w.plane, slice(None), *window(w.start, plan.roi))]

    def add(w: Window, p: torch.Tensor) -> None:
        probs[(w.plane, slice(None), *window(w.start, plan.roi))] += p * imp

    yield from run_windows(runner, clock, todo, read, add, routes, want_routing, Counter(len(todo)))
    prep.work = None  # the work grid is no longer needed
    return probs, weight, routes


def _finish_whole(clock: "_Clock", probs: torch.Tensor, weight: torch.Tensor, routes: RoutingAccumulator,
                  plan: Plan, n_classes: int, want_routing: bool, routing_mode: str, warns: list[str]) -> VolumeResult:
    """Probabilities, labels and routing maps on the image grid, from the blended work-grid results."""
    with clock("postprocess"):
        probs /= weight.clamp_min_(1e-12)
        del weight
        full = _to_image_grid(probs, plan)
        del probs
        labels = _argmax(full, np.uint8 if n_classes <= 255 else np.int32)
    with clock("routing"):
        maps, dominant = ({}, None)
        if want_routing:
            maps, dominant = _routing_maps(routes, plan, routing_mode, warns)
    return full, labels, maps, dominant


class _Clock:
    """Seconds per stage, counting only code inside ``with clock(stage)`` (never the consumer's time)."""

    def __init__(self) -> None:
        self.seconds = {k: 0.0 for k in ("preprocess", "infer", "routing", "postprocess")}
        self._stage = ""

    def __call__(self, stage: str) -> "_Clock":
        self._stage = stage
        return self

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.seconds[self._stage] += time.perf_counter() - self._t0


def _to_work_grid(stack: np.ndarray, plan: Plan) -> torch.Tensor:
    """``[Z, C, *image]`` -> resized/resampled to ``plan.work`` and zero-padded at the end to ``plan.padded``."""
    x = resize(torch.from_numpy(stack), plan.work, antialias=True)
    pad = []
    for w, p in zip(reversed(plan.work), reversed(plan.padded)):
        pad += [0, p - w]
    # zero = the mean after z-score, as MONAI's sliding window pads
    return torch.nn.functional.pad(x, pad).contiguous()


def _out_shape(n: int, planes: int, plan: Plan) -> tuple[int, ...]:
    """``[n, *image]`` for one plane, ``[n, Z, y, x]`` for a stack of slices."""
    return (n, *plan.image) if plan.squeeze else (n, planes, *plan.image)

def _plane(out: np.ndarray, channel: int, z: int, plan: Plan) -> torch.Tensor:
    """The ``[*image]`` view of ``out`` for one channel and plane, as a tensor sharing memory."""
    return torch.from_numpy(out[channel] if plan.squeeze else out[channel, z])


def _on_image_grid(x: torch.Tensor, plan: Plan) -> torch.Tensor:
    """One channel of one plane ``[*padded]`` -> crop the padding, resize back to the image grid."""
    x = x[tuple(slice(0, w) for w in plan.work)]
    return resize(x[None, None], plan.image)[0, 0]


def _to_image_grid(probs: torch.Tensor, plan: Plan) -> np.ndarray:
    """Float16 probabilities on the image grid, one class and plane at a time (float32 temporaries of one image)."""
    out = np.empty(_out_shape(probs.shape[1], probs.shape[0], plan), dtype=np.float16)
    for z in range(probs.shape[0]):
        for c in range(probs.shape[1]):
            _plane(out, c, z, plan).copy_(_on_image_grid(probs[z, c], plan))
    return out


def _argmax(scores: np.ndarray, dtype: type, rows: int = 16) -> np.ndarray:
    """Argmax over axis 0 of ``[K, *grid]``, a few rows of the grid at a time (never a full int64 array)."""
    out = np.empty(scores.shape[1:], dtype=dtype)
    flat_in, flat_out = scores.reshape(scores.shape[0], scores.shape[1], -1), out.reshape(out.shape[0], -1)
    for i in range(0, out.shape[0], rows):
        # numpy's argmax over a leading axis is several times faster than torch's strided one on CPU
        flat_out[i : i + rows] = np.argmax(flat_in[:, i : i + rows], axis=0)
    return out


def _routing_mode(routing: bool | str) -> str:
    if routing is True:
        return "auto"
    if routing is False or routing is None:
        return "none"
    if isinstance(routing, str) and routing in ROUTING_MODES:
        return routing
    raise InferenceError(f"routing={routing!r}: expected True, False or one of {list(ROUTING_MODES)}")


def _keep_positions(mode: str, warns: list[str]) -> Callable[[tuple[int, ...], int], bool]:
    """Whether per-position routing maps of ``shape`` (float16, one per position) are kept, per ``mode``."""

    def keep(shape: tuple[int, ...], n_positions: int) -> bool:
        if mode != "auto":
            return mode == "all"
        size = 2 * int(np.prod(shape)) * n_positions
        if size > AUTO_ALL_BYTES:
            warns.append(f"per-position routing maps skipped ({size / 2**20:.0f} MiB); only the mean map is "
                         "returned: pass routing='all' to keep them")
        return size <= AUTO_ALL_BYTES

    return keep


def _routing_maps(
    routes: RoutingAccumulator, plan: Plan, mode: str, warns: list[str]
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Mean gate weights over positions on the image grid (float16), its argmax (uint8) and, per ``mode``, one map
    per position. Built one expert and plane at a time so float32 temporaries stay the size of one image."""
    positions = routes.positions()
    if not positions:
        return {}, None
    n_experts = routes.n_experts(positions[0])
    shape = _out_shape(n_experts, routes.planes, plan)
    keep = _keep_positions(mode, warns)(shape, len(positions))
    maps = {p: np.empty(shape, dtype=np.float16) for p in positions} if keep else {}
    mean = np.empty(shape, dtype=np.float16)
    for z in range(routes.planes):
        for e in range(n_experts):
            total = None
            for position in positions:
                m = _on_image_grid(routes.expert_cells_upsampled(position, z, e), plan)
                if keep:
                    _plane(maps[position], e, z, plan).copy_(m)
                total = m.clone() if total is None else total.add_(m)
            _plane(mean, e, z, plan).copy_(total.div_(len(positions)))
    maps["mean"] = mean
    return maps, _argmax(mean, np.uint8)
