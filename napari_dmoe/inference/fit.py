"""Does this image fit this model? Compare an image with what the model was trained on (``spec.trained_on``).

``check_fit`` returns findings, each a plain sentence: 2D model on a volume, colour vs grey, a different modality
(when both the model and the image say what they are), a voxel size much coarser than the training data's (a finer
one is resampled without loss), intensities outside the range of the training images, and, given a loaded model
whose record holds its features on the training images, an image unlike them as the model sees it (``ood.py``). The widget shows them as a warning banner; ``dmoe segment`` refuses
unless ``--force``. Models without a record (files written before it existed) are checked for dimensions and
channels only, from their spec.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_dmoe.transforms import intensity_stats  # (training writes them into trained_on, the check reads)

SPACING_FACTOR = 2.0  # a voxel size more than this factor off the training data's along some axis is flagged
# an image statistic is out of distribution when it lies outside the training cases' range widened by this share
# of the training data's p1..p99 spread on each side
INTENSITY_MARGIN = 0.25
# words that name the same kind of image; DICOM Modality codes included (OP ophthalmic photography, SC secondary
# capture is no hint). First match wins.
_FAMILIES = (
    ("fundus", ("fundus", "slo", "retina", "op", "ophthalmic")),
    ("dermoscopy", ("dermoscopy", "dermatoscopy", "skin", "xc")),
    ("CT", ("ct", "computed tomography")),
    ("MR", ("mr", "mri", "magnetic resonance")),
)


@dataclass(frozen=True)
class Finding:
    """One way the image differs from the model's training data. ``kind``: dims, channels, modality, spacing,
    intensity."""

    kind: str
    message: str


def modality_family(text: str | None) -> str | None:
    """"fundus photo (SLO)" -> "fundus", "CT" -> "CT"; None when nothing is known."""
    if not text or str(text).strip().lower() in ("", "unknown", "sc", "ot"):
        return None
    words = str(text).lower().replace("(", " ").replace(")", " ").replace(",", " ").split()
    low = " ".join(words)
    for family, keys in _FAMILIES:
        if any(k in words or (" " in k and k in low) for k in keys):
            return family
    return low


def image_modality(metadata: Mapping[str, Any] | None) -> str | None:
    """What an image says it is: our samples' ``dmoe_modality`` or the DICOM Modality the reader stored."""
    meta = metadata or {}
    return meta.get("dmoe_modality") or (meta.get("modality") if meta.get("format") == "dicom" else None)


def _layout(shape: Sequence[int], rgb: bool | None) -> tuple[int, int]:
    """(spatial dims, channels) of a napari-layout image: (y, x), (y, x, 3|4), (z, y, x), (z, y, x, 3|4)."""
    if rgb is None:
        rgb = len(shape) in (3, 4) and shape[-1] in (3, 4)
    return (len(shape) - 1, int(shape[-1])) if rgb else (len(shape), 1)


def _outside(value: float, bounds: Sequence[float], margin: float) -> bool:
    return value < bounds[0] - margin or value > bounds[1] + margin


def _as_model_sees(normalization: Mapping[str, Any] | None, image: Any) -> tuple[float, list[Finding]]:
    """The factor that brings ``image`` to the training images' units after the engine's documented bit-depth
    conversion (``transforms.for_bit_depth``: a 16-bit PNG is divided by its own full scale, not by 255), so the
    image is judged as the model will see it (issue 28: full-range 16-bit images were refused before the scaling
    that fits them). A conversion the engine refuses is a finding."""
    from napari_dmoe.transforms import TransformError, for_bit_depth

    normalization = dict(normalization or {})
    if normalization.get("kind") != "scale":
        return 1.0, []
    try:
        converted, _ = for_bit_depth(normalization, np.asarray(image).dtype, image)
    except TransformError as err:
        return 1.0, [Finding("intensity", str(err))]
    return float(normalization.get("factor", 1.0)) / float(converted.get("factor", 1.0)), []


def _intensity(train: Mapping[str, Any], image: Any, normalization: Mapping[str, Any] | None = None) -> list[Finding]:
    ratio, refused = _as_model_sees(normalization, image)
    if refused or not train or "case_p50" not in train:
        return refused
    stats = intensity_stats([image])
    if not stats:
        return []
    if ratio != 1.0:  # percentiles scale with the image: the statistics of the image as the model sees it
        stats = {k: ([v[0] * ratio, v[1] * ratio] if k.startswith("case_") else v * ratio)
                 for k, v in stats.items() if k != "n_cases"}
    margin = INTENSITY_MARGIN * max(float(train["p99"]) - float(train["p1"]), 1e-6)
    off = [name for name, key in (("median", "case_p50"), ("99th percentile", "case_p99"))
           if _outside(stats[key][0], train[key], margin)]
    if not off:
        return []
    return [Finding("intensity", (
        f"intensities out of distribution: the image's median is {stats['p50']:.4g} and its 99th percentile "
        f"{stats['p99']:.4g}, while the training images had medians {train['case_p50'][0]:.4g} to "
        f"{train['case_p50'][1]:.4g} and 99th percentiles {train['case_p99'][0]:.4g} to {train['case_p99'][1]:.4g}"))]


def _spacing(train: Sequence[float] | None, spacing: Sequence[float] | None, dims: int) -> list[Finding]:
    if not train or spacing is None:
        return []
    image = [float(s) for s in spacing][-len(train):]
    if len(image) != len(train) or len(spacing) != dims:
        return []
    # coarser only: the engine resamples to the model's voxel size, and finer voxels lose no detail on the way
    ratios = [i / t for i, t in zip(image, train) if t > 0 and i > 0]
    if not ratios or max(ratios) <= SPACING_FACTOR:
        return []
    fmt = "x".join
    return [Finding("spacing", f"voxel size {fmt(f'{s:g}' for s in image)} mm is much coarser than the training "
                               f"data's {fmt(f'{s:g}' for s in train)} mm (more than {SPACING_FACTOR:g}x along an "
                               "axis): detail the model relies on is missing")]


SQUASH_FACTOR = 2.0  # a whole-image resize that distorts the aspect ratio more than this is flagged
MIN_GRID = 8  # fewer voxels than this along an axis, once resampled, hold nothing a model can segment


def _grid(spec: Any, shape: Sequence[int], spacing: Sequence[float] | None, dims: int, rgb: bool) -> list[Finding]:
    """What the engine's plan does to the image's grid: resampling to the model's voxel size that leaves almost
    nothing (0.001 mm voxels), or a whole-image resize that squashes it (128x5000 to 224x224)."""
    from napari_dmoe.inference.plan import make_plan

    spatial = tuple(int(n) for n in (shape[:-1] if rgb else shape))
    if dims != spec.spatial_dims:  # a 2D model on a volume: judged plane by plane
        spatial = spatial[-spec.spatial_dims:]
        spacing = None if spacing is None else tuple(spacing)[-spec.spatial_dims:]
    try:
        plan = make_plan(spec, spatial, spacing, None, 0.25)
    except (ValueError, OverflowError):  # the engine refuses these itself, with its own message
        return []
    fmt = "x".join
    if plan.mode != "resize" and min(plan.work) < MIN_GRID <= min(spatial):  # resampled to the model's voxels
        return [Finding("spacing", f"at the model's voxel size ({fmt(f'{t:g}' for t in spec.spacing)} mm) the image's "
                                   f"{fmt(map(str, spatial))} voxels of {fmt(f'{s:g}' for s in spacing)} mm become "
                                   f"{fmt(map(str, plan.work))}: too few to segment; check the voxel size")]
    if plan.mode == "resize":  # the whole plane to the input size, whatever its shape
        ratios = [n / s for n, s in zip(spatial, spec.input_size)]
        squash = max(ratios) / min(ratios)
        if squash > SQUASH_FACTOR:
            return [Finding("shape", f"the whole {fmt(map(str, spatial))} image is resized to the model's input of "
                                     f"{fmt(map(str, spec.input_size))}, squashing it {squash:.3g}x more along one "
                                     "axis than the other; crop it to the region of interest first")]
    return []


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


def _span(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_number, value)) and value[0] <= value[1]


_RECORD_FORMS = {  # what each trained_on field must look like to be used (a file's header can say anything)
    "modality": lambda v: v is None or isinstance(v, str),
    "spatial_dims": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v in (2, 3)),
    "channels": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4),
    "spacing": lambda v: v is None or (isinstance(v, (list, tuple)) and 1 <= len(v) <= 3
                                       and all(_number(x) and x > 0 for x in v)),
    "intensity": lambda v: v is None or (isinstance(v, Mapping) and ("case_p50" not in v or (
        _number(v.get("p1")) and _number(v.get("p99")) and _span(v.get("case_p50")) and _span(v.get("case_p99"))))),
}


def _sound_record(record: Mapping[str, Any]) -> tuple[dict[str, Any], list[Finding]]:
    """The trained_on fields of the right form, and a "record" finding naming each damaged one (the image is then
    judged without it, never a traceback: issue 28)."""
    sound, findings = dict(record), []
    for key, ok in _RECORD_FORMS.items():
        if key in sound and not ok(sound[key]):
            shown = str(sound[key])[:60]
            findings.append(Finding("record", f"the model's trained_on.{key} record is damaged ({shown!r}); the image "
                                              "was not compared on it"))
            sound.pop(key)
    return sound, findings


def check_fit(spec: Any, image: Any, spacing: Sequence[float] | None = None, *, rgb: bool | None = None,
              modality: str | None = None) -> list[Finding]:
    """Findings that say how ``image`` (napari layout, raw intensities) differs from ``spec``'s training data.

    ``spec``: a model's spec, or a loaded model (``.spec``, ``.network``); a model whose record holds features is
    also judged on them, as it sees the image (``ood.feature_findings``: score and threshold in the message).
    ``spacing``: per spatial axis in mm, None when unknown. ``modality``: what the image is, when known (DICOM
    Modality, a sample's label; see ``image_modality``). An empty list means nothing was found.
    """
    model, spec = spec, getattr(spec, "spec", spec)
    rec, damaged = _sound_record(spec.trained_on or {})
    dims, channels = _layout(np.shape(image), rgb)
    findings: list[Finding] = list(damaged)
    model_dims = rec.get("spatial_dims") or spec.spatial_dims
    if dims != model_dims:
        what = {3: "3D volume", 2: "2D image"}.get(dims, f"{dims}-D array, not an image")
        extra = "; it would be segmented slice by slice" if model_dims == 2 else ""
        findings.append(Finding("dims", f"the model was trained on {model_dims}D images; this is a {what}{extra}"))
    model_channels = rec.get("channels") or spec.in_channels
    if channels != model_channels:
        def kind(n: int) -> str:
            return "grey (1 channel)" if n == 1 else f"colour ({n} channels)"

        findings.append(Finding("channels", f"the image is {kind(channels)}; the model was trained on "
                                            f"{kind(model_channels)} images"))
    trained, given = modality_family(rec.get("modality")), modality_family(modality)
    if trained and given and trained != given:
        findings.append(Finding("modality", f"kind of image: {modality}, while the model was trained on "
                                            f"{rec.get('modality')}"))
    findings += _spacing(rec.get("spacing"), spacing, dims)
    findings += _intensity(rec.get("intensity") or {}, image, spec.normalization)
    findings += _grid(spec, np.shape(image), spacing, dims, channels > 1)
    if rec.get("features") is not None and getattr(model, "network", None) is not None:
        from napari_dmoe.inference.ood import feature_findings  # torch: only when a network is given

        findings += feature_findings(model, image, spacing, rgb)
    return findings


def describe(findings: Sequence[Finding]) -> str:
    """The findings as one line: "a; b; c"."""
    return "; ".join(f.message for f in findings)


class FitError(ValueError):
    """The image does not fit the model; the message names the file, what differs and how to go ahead.

    ``findings`` stay on the error so a front end can show them or say its own way to force (``hint``)."""

    def __init__(self, source: Any, findings: Sequence[Finding] = (), model: str = "",
                 how: str = "pass --force to segment it anyway") -> None:
        self.source, self.findings, self.model = source, list(findings), model
        if not self.findings:  # a ready-made message
            super().__init__(str(source))
            return
        which = f"the model {model!r}" if model else "the model"
        super().__init__(f"{source}: does not fit {which} ({describe(self.findings)}); check the model and the "
                         f"image, or {how}")

    def hint(self, how: str) -> "FitError":
        """The same refusal, saying ``how`` this front end segments anyway."""
        return FitError(self.source, self.findings, self.model, how)
