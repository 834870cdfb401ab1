"""napari File > Open Sample: synthetic fundus, prostate CT and skin images made on the fly (no download).

Each sample returns the image with its patient attribute in ``metadata["dmoe_attributes"]`` and what kind of image
it is in ``metadata["dmoe_modality"]`` (checked against the model's training record), and the ground truth as a
hidden labels layer whose name starts with "GROUND TRUTH", so it is never mistaken for a result. The generators import only numpy/scipy, so opening the menu stays fast.
"""
from __future__ import annotations

from typing import Any

LayerData = list[tuple[Any, dict[str, Any], str]]
SAMPLE_SEED = 2025  # fixed so every user sees the same sample


def _attrs(name: str, value: str, modality: str) -> dict[str, Any]:
    return {"dmoe_attributes": {name: value}, "dmoe_synthetic": True, "dmoe_modality": modality}


def _truth(what: str) -> dict[str, Any]:
    """Ground truth opens hidden (tick its eye to compare) and named so in a narrow layer list."""
    return {"name": f"GROUND TRUTH {what}", "visible": False, "opacity": 0.4}


def fundus_sample() -> LayerData:
    """A 2D fundus-like SLO image of the rare group (race Black) with its rim/cup ground truth."""
    from napari_dmoe.synthetic import make_fundus

    sample = make_fundus(SAMPLE_SEED, race="Black", size=224)
    meta = _attrs("race", sample.race, "fundus photo (SLO)")
    return [
        (sample.image, {"name": "fundus (synthetic)", "scale": (1.0, 1.0), "metadata": meta}, "image"),
        (sample.classes, {**_truth("fundus (1 rim, 2 cup)"), "scale": (1.0, 1.0), "metadata": meta}, "labels"),
    ]


def prostate_sample() -> LayerData:
    """A 3D prostate-like CT of stage T3 (CTV reaching the seminal vesicles), (z, y, x) with spacing in mm."""
    from napari_dmoe.synthetic import make_prostate

    case = make_prostate(SAMPLE_SEED, stage="T3")
    image, label, spacing = case.napari_order()
    meta = _attrs("stage", case.stage, "CT")
    # named slider: beside a 2D result's expert stack (the same first axis) the slider still says "z"
    common = {"scale": spacing, "metadata": meta, "axis_labels": ("z", "y", "x")}
    return [
        (image, {"name": "prostate CT (synthetic)", "contrast_limits": (-200, 300), **common}, "image"),
        (label, {**_truth("CTV"), **common}, "labels"),
    ]


def skin_sample() -> LayerData:
    """A 2D dermoscopy-like RGB image of the rare 80+ age group with its lesion mask."""
    from napari_dmoe.synthetic import make_skin

    sample = make_skin(SAMPLE_SEED, age_group="80+")
    meta = _attrs("age", sample.age_group, "dermoscopy")
    return [
        (sample.image, {"name": "skin lesion (synthetic)", "rgb": True, "metadata": meta}, "image"),
        ((sample.mask > 0).astype("uint8"), {**_truth("lesion"), "metadata": meta}, "labels"),
    ]


def retina_photo() -> LayerData:
    """The real colour fundus photograph that ships with scikit-image (no ground truth, no attribute)."""
    from skimage import data

    meta = {"dmoe_synthetic": False, "dmoe_modality": "fundus photo"}
    return [(data.retina(), {"name": "retina (scikit-image)", "rgb": True, "metadata": meta}, "image")]
