"""Site calibration of a 2D model's field of view: measure how large a site's structure looks, undo the difference.

A camera with a wider view shows the optic disc smaller; a model trained at one camera's scale loses its rare
groups at another's (issue 26). Fundus cameras seldom write a pixel size, but an optic disc is about the same size
in every eye, so the scale of a site can be measured from its own unlabelled images: the model segments them as
they are, the median foreground radius is compared with the same measure on the model's training images
(``trained_on["scale"]``), and the ratio is the zoom that brings the site to the training scale. It is the
two-stage practice of optic disc and cup segmentation (find the disc, normalise its size), done once per site.

Only for structures of a stable size (an optic disc, an organ); a lesion's size says nothing about the camera.
Issue 26's study (sample_data/results/seeds/site-zoom) found the measured zoom lowered the mean worst-group Dice
on its validation cameras (the radius a model finds follows the true one by about a third, and the camera's
contrast moves it too), so ``dmoe calibrate`` reports it as a measure; the zoom itself stays an engine option.
The zoom itself is MONAI's ``Zoom`` about the image centre (size kept): applied to the image before the model and
inverted on the probabilities, routing maps and dominant expert after it (``zoom_back``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from napari_dmoe.inference.plan import InferenceError
from napari_dmoe.limits import ZOOM_RANGE  # a measured zoom is clipped to it; a given one outside it is refused

MIN_IMAGES = 10  # images with a foreground a site measure needs (and at least half of those measured)
REFERENCE_CASES = 64  # training images the reference is measured on (seeded sample)
PROBE = 1.15  # the second round's zoom (or 1 / PROBE): far enough from 1 for the model's answer to show


@dataclass(frozen=True)
class Calibration:
    """A site's zoom (clipped to ZOOM_RANGE) and what it was measured on: ``site_radius`` is the median radius
    the model finds on the site's images as they are; ``rounds`` 1 is ``reference / site_radius``, 2 the line of
    ``refine`` through a second measure at a probe zoom."""

    zoom: float
    site_radius: float
    reference_radius: float
    n_measured: int
    n_images: int
    clipped: bool
    rounds: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"zoom": round(self.zoom, 4), "site_radius": round(self.site_radius, 5),
                "reference_radius": round(self.reference_radius, 5), "n_measured": self.n_measured,
                "n_images": self.n_images, "clipped": self.clipped, "rounds": self.rounds}


def foreground_radius(labels: np.ndarray) -> float | None:
    """sqrt(foreground area / pi) / sqrt(height x width) of a 2D label image (any class but 0 is foreground);
    None without foreground."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise InferenceError(f"the foreground radius needs one 2D label image, got shape {labels.shape}")
    area = int(np.count_nonzero(labels))
    return math.sqrt(area / math.pi) / math.sqrt(labels.size) if area else None


def check_zoom(zoom: float, spatial_dims: int) -> float:
    """``zoom`` as a float, refused outside ZOOM_RANGE or for a 3D model (whose voxel size does this job)."""
    try:
        zoom = float(zoom)
    except (TypeError, ValueError):
        raise InferenceError(f"zoom={zoom!r}: expected a number such as 1.1") from None
    if zoom != 1.0 and spatial_dims != 2:
        raise InferenceError("zoom is for 2D models; a 3D model is brought to its scale by the voxel size")
    if not ZOOM_RANGE[0] <= zoom <= ZOOM_RANGE[1]:
        raise InferenceError(f"zoom={zoom:g} is outside {ZOOM_RANGE[0]}-{ZOOM_RANGE[1]}: a camera that far from "
                             "the training scale needs a model trained at its scale")
    return zoom


def _zoom_planes(array: np.ndarray, factor: float, axes: tuple[int, int], mode: str, padding: str) -> np.ndarray:
    """``array`` zoomed by ``factor`` about the centre on two ``axes`` (size kept), every other axis as channels."""
    from monai.transforms import Zoom
    import torch

    moved = np.moveaxis(np.asarray(array), axes, (-2, -1))
    flat = moved.reshape(-1, *moved.shape[-2:])
    out = Zoom(factor, mode=mode, padding_mode=padding, keep_size=True)(torch.from_numpy(
        np.ascontiguousarray(flat, dtype=np.float32)))
    out = np.asarray(out.detach().cpu() if hasattr(out, "detach") else out)
    return np.moveaxis(out.reshape(moved.shape), (-2, -1), axes)


def zoom_image(image: np.ndarray, zoom: float, rgb: bool) -> np.ndarray:
    """The image (``(y, x)``, ``(y, x, C)`` when ``rgb``, or a stack of planes) zoomed by ``zoom`` about its centre,
    in its own storage type; edge values fill what a zoom below 1 uncovers."""
    image = np.asarray(image)
    out = _zoom_planes(image, zoom, (-3, -2) if rgb else (-2, -1), "bilinear", "edge")
    if image.dtype.kind in "ui":  # the same storage type: the engine's bit-depth rule reads it
        info = np.iinfo(image.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(image.dtype)
    return out.astype(image.dtype if image.dtype.kind == "f" else np.float32)


def zoom_back(seg: Any, zoom: float) -> Any:
    """A ``Segmentation`` of the zoomed image mapped back to the image grid: probabilities and routing maps by
    1 / ``zoom`` (what the zoomed view never saw is background), labels and dominant expert recomputed/nearest."""
    import dataclasses

    inverse = 1.0 / zoom
    probs = _zoom_planes(seg.probabilities, inverse, (-2, -1), "bilinear", "constant")
    probs[0] += np.clip(1.0 - probs.sum(axis=0), 0.0, None)  # outside the zoomed view: background
    labels = np.argmax(probs, axis=0).astype(seg.labels.dtype)
    routing = {k: _zoom_planes(v, inverse, (-2, -1), "bilinear", "edge").astype(v.dtype)
               for k, v in seg.routing.items()}
    dominant = seg.dominant_expert
    if dominant is not None:
        dominant = np.rint(_zoom_planes(dominant[None], inverse, (-2, -1), "nearest", "edge")[0]).astype(
            dominant.dtype)
    note = f"zoomed x{zoom:.3g} about the centre to the model's training scale (site calibration), mapped back"
    return dataclasses.replace(seg, probabilities=probs.astype(seg.probabilities.dtype), labels=labels,
                               routing=routing, dominant_expert=dominant, conversions=[*seg.conversions, note])


def measure(model: Any, images: Iterable[tuple[np.ndarray, bool]], **engine_options: Any) -> list[float | None]:
    """Each image's foreground radius as ``model`` segments it with the attribute unknown (routers averaged: no
    patient data needed). ``images``: (image, rgb) pairs of single 2D images."""
    from napari_dmoe.inference.engine import segment

    if model.spec.spatial_dims != 2:
        raise InferenceError("site calibration is for 2D models; a 3D model's scale comes from the voxel size")
    options = {"routing": "none", **engine_options}
    return [foreground_radius(segment(model, image, None, rgb=rgb, **options).labels) for image, rgb in images]


def site_zoom(reference: float, radii: Sequence[float | None]) -> Calibration:
    """The zoom that brings a site whose images measured ``radii`` to the ``reference`` radius."""
    found = [r for r in radii if r is not None]
    if len(found) < MIN_IMAGES or 2 * len(found) < len(radii):
        raise InferenceError(f"the model found a foreground in {len(found)} of {len(radii)} images; a site "
                             f"calibration needs at least {MIN_IMAGES} and at least half: give more images of "
                             "the site, or images the model can segment")
    if not reference > 0:
        raise InferenceError(f"the reference radius {reference!r} must be a positive number")
    site = float(np.median(found))
    raw = reference / site
    zoom = float(np.clip(raw, *ZOOM_RANGE))
    return Calibration(zoom, site, float(reference), len(found), len(radii), zoom != raw)


def refine(first: Calibration, radii: Sequence[float | None], probe: float) -> Calibration:
    """A second round: ``radii`` measured on the site's images through the zoom ``probe`` (on the image grid). A
    model pulls every disc towards the size it was trained on (on our fundus models the radius it finds moves by
    about a third of the true change), so one round under-corrects. The radius seen in the zoomed view is close to
    linear in the zoom; the line through both measures gives the zoom at which it meets the reference. A fixed
    probe, not the first zoom, keeps that line well measured when the first zoom is close to 1."""
    second = site_zoom(first.reference_radius, radii)
    slope = (second.site_radius * probe - first.site_radius) / (probe - 1.0)
    if not slope > 0.05 * first.site_radius:  # the model hardly follows a zoom: the line says nothing
        raise InferenceError(f"the model's foreground hardly changes when the site's images are zoomed by {probe:.3g} "
                             "(the radius it finds follows the zoom by less than 5 %): the site's scale cannot be "
                             "measured with it; use one round (--rounds 1) or no zoom")
    raw = 1.0 + (first.reference_radius - first.site_radius) / slope
    zoom = float(np.clip(raw, *ZOOM_RANGE))
    return dataclasses.replace(first, zoom=zoom, clipped=zoom != raw, rounds=2)


def probe_zoom(first: Calibration) -> float:
    """The second round's zoom: PROBE towards the side the first round points to."""
    return PROBE if first.zoom >= 1.0 else 1.0 / PROBE


def calibrate_site(model: Any, images: Callable[[], Iterable[tuple[np.ndarray, bool]]], reference: float,
                   rounds: int = 2, **engine_options: Any) -> Calibration:
    """A site's zoom for ``model`` from its images (``images()`` yields them anew for each round)."""
    if rounds not in (1, 2):
        raise InferenceError(f"rounds={rounds}: 1 or 2")
    first = site_zoom(reference, measure(model, images(), **engine_options))
    if rounds == 1:
        return first
    probe = probe_zoom(first)
    return refine(first, measure(model, images(), zoom=probe, **engine_options), probe)


def reference_record(model: Any, images: Iterable[tuple[np.ndarray, bool]]) -> dict[str, Any] | None:
    """``trained_on["scale"]`` of a 2D model: the median foreground radius of its training images as it segments
    them (None for 3D models, or when fewer than MIN_IMAGES show a foreground)."""
    if model.spec.spatial_dims != 2:
        return None
    first = next(model.network.parameters(), None)  # where training left it: no network moves per image
    device = str(first.device) if first is not None else "cpu"
    found = [r for r in measure(model, images, device=device, amp=False) if r is not None]
    if len(found) < MIN_IMAGES:
        return None
    return {"foreground_radius": round(float(np.median(found)), 5), "cases": len(found),
            "spread": [round(float(q), 5) for q in np.percentile(found, [10, 90])]}
