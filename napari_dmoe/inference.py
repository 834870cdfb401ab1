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
- Windows: MONAI's ``sliding_window_inference`` calls the predictor synchronously, so a generator cannot yield
  from inside it and routing records could not be tied to window positions. We therefore lay the windows out
  ourselves (same scan as MONAI, interval rounded to a multiple of 4 for the routing maps; a test checks the
  result against ``sliding_window_inference``) and blend with MONAI's ``compute_importance_map``.
- Probabilities are blended (MONAI importance maps) and averaged across routers when the attribute is unknown;
  labels are their argmax.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Generator, NamedTuple, Sequence

import numpy as np
import torch

from napari_dmoe.devices import DeviceError, resolve_device
from napari_dmoe.inference_prep import InferenceError, Plan, make_plan, prepare_image, resolve_routers
from napari_dmoe.routing_maps import RoutingAccumulator, importance, resize

__all__ = ["InferenceError", "Progress", "Segmentation", "iter_segment", "segment"]


class Progress(NamedTuple):
    """``done`` of ``total`` steps of ``stage`` ("preprocess", "infer", "postprocess")."""

    stage: str
    done: int
    total: int


@dataclass
class Segmentation:
    """Result on the input image grid. ``routing`` is empty (and ``dominant_expert`` None) without MoE."""

    labels: np.ndarray
    probabilities: np.ndarray
    routing: dict[str, np.ndarray]
    dominant_expert: np.ndarray | None
    attribute: dict[str, str] | str
    timings: dict[str, float]
    device: str
    warnings: list[str] = field(default_factory=list)
    conversions: list[str] = field(default_factory=list)
    device_reason: str = ""


def segment(model: Any, image: np.ndarray, attribute: Any = None, **kwargs: Any) -> Segmentation:
    """Segment ``image`` with ``model`` (see ``iter_segment`` for the options) and return the result."""
    gen = iter_segment(model, image, attribute, **kwargs)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


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
    routing: bool = True,
    unknown: str = "average",
    rgb: bool | None = None,
    mode2d: str = "auto",
) -> Generator[Progress, None, Segmentation]:
    """Yield progress while segmenting; return a Segmentation.

    ``image``: (y, x), (y, x, 3|4) colour, (z, y, x) or (z, y, x, 3|4); ``spacing`` per spatial axis in the
    same order. ``attribute``: a value (one-attribute model), a dict name -> value, or None / "unknown" to
    average over all routers (``unknown="error"`` refuses instead). ``rgb``: None guesses from the last axis.
    """
    if not 0 <= overlap < 1:
        raise InferenceError(f"overlap={overlap} must be in [0, 1)")
    if sw_batch_size < 1:
        raise InferenceError(f"sw_batch_size={sw_batch_size} must be at least 1")
    if blend not in ("gaussian", "constant"):
        raise InferenceError(f"blend={blend!r}: expected 'gaussian' or 'constant'")
    spec, network = model.spec, model.network
    clock = _Clock()
    with clock("preprocess"):
        routers, used = resolve_routers(spec, attribute, unknown)
        try:
            dev, reason = resolve_device(device)
        except DeviceError as err:
            raise InferenceError(str(err)) from None
        stack, image_spacing, squeeze, notes, warns = prepare_image(spec, image, spacing, rgb)
        plan = make_plan(spec, stack.shape[2:], image_spacing, roi_size, overlap, mode2d, squeeze)
        work = _to_work_grid(stack, plan)
    yield Progress("preprocess", 1, 1)

    runner = _Runner(network, dev, amp, sw_batch_size, warns)
    n_classes = spec.n_classes
    probs = torch.zeros((work.shape[0], n_classes, *plan.padded), dtype=torch.float32)
    weight = torch.zeros((1, *plan.padded), dtype=torch.float32)
    imp = importance(plan.roi, blend)
    for start in plan.starts:
        weight[(slice(None), *_window(start, plan.roi))] += imp * len(routers)
    routes = RoutingAccumulator(work.shape[0], plan.padded, plan.roi, plan.align, blend)
    want_routing = routing and spec.routing != "none"

    windows = [(z, s) for z in range(work.shape[0]) for s in plan.starts]
    batches = [windows[i : i + sw_batch_size] for i in range(0, len(windows), sw_batch_size)]
    total, done = len(batches) * len(routers), 0
    try:
        runner.start()
        for router in routers:
            for batch in batches:
                with clock("infer"):
                    x = torch.stack([work[(z, slice(None), *_window(s, plan.roi))] for z, s in batch])
                    p, records = runner.predict(x, router, want_routing)
                    for b, (z, s) in enumerate(batch):
                        probs[(z, slice(None), *_window(s, plan.roi))] += p[b] * imp
                with clock("routing"):
                    for position, w in records.items():
                        for b, (z, s) in enumerate(batch):
                            routes.add(position, z, s, w[b])
                done += 1
                yield Progress("infer", done, total)
    finally:
        runner.stop()

    yield Progress("postprocess", 0, 1)
    with clock("postprocess"):
        probs /= weight.clamp_min(1e-12)
        full = _to_image_grid(probs, plan)
        labels = full.argmax(dim=1)
        if plan.squeeze:
            full, labels = full[0], labels[0]
        else:  # slice by slice: channels first, then z
            full = full.transpose(0, 1)
    with clock("routing"):
        maps, dominant = _routing_maps(routes, plan) if want_routing else ({}, None)
    return Segmentation(
        labels=labels.numpy().astype(np.uint8 if n_classes <= 255 else np.int32),
        probabilities=full.to(torch.float16).numpy(),
        routing=maps,
        dominant_expert=dominant,
        attribute=used,
        timings=clock.seconds,
        device=str(dev),
        warnings=warns,
        conversions=notes,
        device_reason=reason,
    )


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


def _window(start: Sequence[int], roi: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(s, s + r) for s, r in zip(start, roi))


def _to_work_grid(stack: np.ndarray, plan: Plan) -> torch.Tensor:
    """``[Z, C, *image]`` -> resized/resampled to ``plan.work`` and zero-padded at the end to ``plan.padded``."""
    x = resize(torch.from_numpy(stack), plan.work, antialias=True)
    pad = []
    for w, p in zip(reversed(plan.work), reversed(plan.padded)):
        pad += [0, p - w]
    # zero = the mean after z-score, as MONAI's sliding window pads
    return torch.nn.functional.pad(x, pad).contiguous()


def _to_image_grid(probs: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Crop the padding and resize back to the image grid, one plane at a time (memory)."""
    crop = tuple(slice(0, w) for w in plan.work)
    out = torch.empty((probs.shape[0], probs.shape[1], *plan.image), dtype=torch.float32)
    for z in range(probs.shape[0]):
        out[z] = resize(probs[z : z + 1][(slice(None), slice(None), *crop)], plan.image)[0]
    return out


def _routing_maps(routes: RoutingAccumulator, plan: Plan) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Per-position maps on the image grid, their mean over positions, and its argmax (uint8)."""
    positions = routes.positions()
    if not positions:
        return {}, None
    planes = routes.planes
    maps: dict[str, np.ndarray] = {}
    mean = None
    for position in positions:
        per_plane = torch.stack([routes.full_resolution(position, z, plan.work, plan.image) for z in range(planes)])
        mean = per_plane.float() if mean is None else mean.add_(per_plane.float())
        maps[position] = _layout(per_plane, plan).numpy()
    mean /= len(positions)
    dominant = mean.argmax(dim=1).to(torch.uint8)
    maps["mean"] = _layout(mean.to(torch.float16), plan).numpy()
    return maps, (dominant[0] if plan.squeeze else dominant).numpy()


def _layout(x: torch.Tensor, plan: Plan) -> torch.Tensor:
    """``[Z, E, *grid]`` -> ``[E, *grid]`` for one plane, ``[E, Z, y, x]`` for a stack of slices."""
    return x[0] if plan.squeeze else x.transpose(0, 1).contiguous()


class _Runner:
    """Moves the network to the device, runs window batches (AMP on CUDA), halves the batch on CUDA OOM."""

    def __init__(self, network: torch.nn.Module, device: torch.device, amp: bool, batch: int, warns: list) -> None:
        self.network, self.device, self.batch, self.warns = network, device, batch, warns
        self.amp = amp and device.type == "cuda"
        first = next(network.parameters(), None)
        self.home = first.device if first is not None else torch.device("cpu")
        self.was_training = network.training

    def start(self) -> None:
        self.network.eval()
        self.network.to(self.device)

    def stop(self) -> None:
        """Always called (also on close or error): the network goes home and the CUDA cache is emptied."""
        self.network.to(self.home)
        self.network.train(self.was_training)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def predict(self, x: torch.Tensor, router: int, want_routing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Softmax probabilities ``[B, classes, *roi]`` and gate weights per position, both on the CPU."""
        while True:
            try:
                return self._chunks(x, router, want_routing)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                if self.batch == 1:
                    raise InferenceError(
                        f"ran out of GPU memory on {self.device} even with one window at a time; use "
                        "device='cpu' or a smaller roi_size"
                    ) from None
                self.batch = max(1, self.batch // 2)
                self.warns.append(f"GPU out of memory: retried with sw_batch_size={self.batch}")

    def _chunks(self, x: torch.Tensor, router: int, want_routing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        probs, routes = [], {}
        for i in range(0, x.shape[0], self.batch):
            chunk = x[i : i + self.batch].to(self.device)
            attr = torch.full((chunk.shape[0],), router, dtype=torch.long, device=self.device)
            autocast = torch.autocast("cuda", dtype=torch.float16) if self.amp else nullcontext()
            with torch.inference_mode(), autocast:
                if want_routing:
                    from napari_dmoe.model.moe import capture_routing

                    with capture_routing(self.network) as records:
                        logits = self.network(chunk, attr)
                else:
                    records, logits = [], self.network(chunk, attr)
            probs.append(torch.softmax(logits.float(), dim=1).cpu())
            for rec in records:  # a shared dMoE is called once per block: positions are already distinct
                routes.setdefault(rec.position, []).append(rec.weights.float().cpu())
        return torch.cat(probs), {k: torch.cat(v) for k, v in routes.items()}

