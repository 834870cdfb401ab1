"""``dmoe calibrate MODEL IMAGES...``: the zoom that brings a site's camera to a 2D model's training scale.

The model segments the site's images as they are (attribute unknown); their median foreground radius against the
model's own on its training images (``trained_on.scale``, or ``--reference-images``) gives the zoom that would
bring the site to the training scale (``--zoom`` of ``dmoe segment`` and ``dmoe evaluate``;
``napari_dmoe.inference.scale``). Experimental: issue 26's study found the measured zoom lowers the worst group on
its validation cameras, so the verb reports a measure and recommends nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterator

MAX_IMAGES = 5000  # a site batch; more says nothing the median of 5000 does not


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "calibrate", help="measure how a 2D site's scale differs from the model's training images (experimental)",
        description="Segment the site's images (files or folders of PNG/JPG/TIFF; attribute unknown), compare "
        "their median foreground radius with the model's on its training images, and print the zoom that would "
        "bring them together (`--zoom` of segment and evaluate). Experimental: on the validation cameras of our "
        "study (sample_data/results/seeds/site-zoom) segmenting with the measured zoom LOWERED the mean "
        "worst-group Dice; it measures a site, it is not a recommended setting. For structures of a stable size "
        "(an optic disc), not lesions.")
    p.add_argument("model", help="a 2D napari-dmoe model file (.safetensors)")
    p.add_argument("images", nargs="+", help="the site's images: files, or folders of image files")
    p.add_argument("--reference-images", nargs="+", metavar="PATH",
                   help="images of the model's training site, for a model without a trained_on.scale record")
    p.add_argument("--rounds", type=int, choices=[1, 2], default=1,
                   help="measures of the site: 1 (as the images are; default) or 2 (again through a probe zoom, then "
                   "the line through both: a model pulls discs towards its training size, so one round "
                   "under-corrects; two rounds did worse still in our study)")
    p.add_argument("--json", dest="json_out", metavar="FILE", help="also write the calibration as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def image_files(paths: list[str]) -> list[Path]:
    """The image files named or inside the named folders (not recursive), sorted per folder; at most MAX_IMAGES."""
    from napari_dmoe.io.formats import PLAIN_SUFFIXES, suffix_of

    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.is_file() and suffix_of(p) in PLAIN_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    if not files:
        raise ValueError(f"no PNG/JPG/TIFF images in {', '.join(paths)}")
    if len(files) > MAX_IMAGES:
        raise ValueError(f"{len(files)} images: give at most {MAX_IMAGES} (a sample of the site is enough)")
    return files


def _read(files: list[Path], quiet: bool) -> Iterator[tuple[Any, bool]]:
    from napari_dmoe.io.images import read_image

    for i, path in enumerate(files):
        volume = read_image(path)
        if not quiet and (i + 1) % 50 == 0:
            print(f"dmoe calibrate: {i + 1}/{len(files)} images", file=sys.stderr, flush=True)
        yield volume.array, volume.rgb


def model_reference(spec: Any) -> float | None:
    """The trained_on.scale reference radius, when the model has a sound one."""
    record = (spec.trained_on or {}).get("scale")
    value = record.get("foreground_radius") if isinstance(record, dict) else None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 < value < 1
    return float(value) if ok else None


def _wide(spread: Any) -> bool:
    """A training record whose 10th-90th percentile radii differ by more than half: not a stable-size structure."""
    ok = isinstance(spread, list) and len(spread) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in spread)
    return ok and spread[1] > 1.5 * spread[0]


def run(args: argparse.Namespace) -> int:
    from napari_dmoe.inference.plan import InferenceError
    from napari_dmoe.inference.scale import calibrate_site, measure, site_zoom
    from napari_dmoe.io.checkpoint import load_model
    from napari_dmoe.io.files import atomic_write_text
    from napari_dmoe.io.outputs import check_single

    site_files = image_files(args.images)
    reference_files = image_files(args.reference_images) if args.reference_images else None
    if args.json_out:
        check_single([args.json_out], [args.model, *site_files, *(reference_files or [])], args.overwrite)
    model = load_model(args.model)
    if model.spec.spatial_dims != 2:
        raise InferenceError(f"{args.model} is a 3D model: its scale comes from the voxel size, not a zoom")
    reference = model_reference(model.spec)
    if reference_files is not None:
        reference = site_zoom(1.0, measure(model, _read(reference_files, True), device=args.device)).site_radius
    elif reference is None:
        record = (model.spec.trained_on or {}).get("scale")
        why = ("has no trained_on.scale record (trained before site calibration existed)" if record is None
               else f"has a damaged trained_on.scale record ({str(record)[:60]!r})")
        raise InferenceError(f"{args.model} {why}: give --reference-images with images of its training site")
    calibration = calibrate_site(model, lambda: _read(site_files, args.quiet), reference, args.rounds,
                                 device=args.device)
    if args.json_out:
        data = {"model": str(args.model), "images": len(site_files), **calibration.to_dict()}
        atomic_write_text(args.json_out, json.dumps(data, indent=2) + "\n")
    spread = (model.spec.trained_on or {}).get("scale", {}).get("spread") if reference_files is None else None
    if _wide(spread):
        print(f"dmoe calibrate: warning: the foreground of this model's training images varies widely in size (radius "
              f"{spread[0]:.3f} to {spread[1]:.3f}, 10th to 90th percentile): a site's median says little about its "
              "camera for such a structure (a lesion); use the zoom only for structures of a stable size",
              file=sys.stderr)
    clipped = " (clipped: the site is further from the training scale than a zoom should correct)" \
        if calibration.clipped else ""
    print(f"zoom {calibration.zoom:.3f}{clipped}: the site's foreground radius is {calibration.site_radius:.4f} of "
          f"the image side as the model finds it (median of {calibration.n_measured} of {calibration.n_images} "
          f"images), on its training images {calibration.reference_radius:.4f} ({calibration.rounds} round(s)). "
          "A measure, not a setting: on our study's validation cameras segmenting with it lowered the worst "
          "group (sample_data/results/seeds/site-zoom)")
    return 0
