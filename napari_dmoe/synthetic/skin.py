"""2D skin-lesion-like dermoscopy images (like HAM10000) in five age groups, written in the HAM10000 layout.

Fairness design (see sample_data/README.md): lesions of older patients have an ill-defined, faintly pigmented
periphery that the annotators include in the lesion; its width grows with age (none at 0-19, ~35 % of the
radius at 80+). The strong visible edge therefore sits at a different place relative to the true boundary in
each age group. Age also shifts appearance (size, irregularity, colour, sun-damaged background), overlapping.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from napari_dmoe.io.files import atomic_write
from napari_dmoe.synthetic.common import SyntheticDataError, allocate, check_frequencies, rng_for, smooth_noise, soft_step

AGE_GROUPS = ("0-19", "20-39", "40-59", "60-79", "80+")
AGE_FREQUENCIES = {"0-19": 0.05, "20-39": 0.20, "40-59": 0.35, "60-79": 0.30, "80+": 0.10}
_AGES = {"0-19": (5, 10, 15), "20-39": (20, 25, 30, 35), "40-59": (40, 45, 50, 55), "60-79": (60, 65, 70, 75),
         "80+": (80, 85)}  # HAM10000 ages are multiples of 5

# radius: lesion radius / image height; irregular: border harmonics; halo: labelled faint periphery as a
# fraction of the radius; pigment: core darkening; variegation: patchiness; sun: background mottling.
AGE_LOOK = {
    "0-19": dict(radius=0.20, irregular=0.04, halo=0.00, pigment=0.55, variegation=0.05, sun=0.00),
    "20-39": dict(radius=0.22, irregular=0.06, halo=0.07, pigment=0.50, variegation=0.08, sun=0.02),
    "40-59": dict(radius=0.25, irregular=0.08, halo=0.16, pigment=0.45, variegation=0.12, sun=0.04),
    "60-79": dict(radius=0.27, irregular=0.11, halo=0.26, pigment=0.40, variegation=0.16, sun=0.06),
    "80+": dict(radius=0.28, irregular=0.13, halo=0.36, pigment=0.36, variegation=0.20, sun=0.08),
}
_DX = {  # diagnosis mix shifts from naevi in the young to keratoses, carcinomas and melanoma in the old
    "0-19": [0.95, 0.02, 0.01, 0.0, 0.0, 0.02, 0.0],
    "20-39": [0.85, 0.05, 0.03, 0.01, 0.0, 0.03, 0.03],
    "40-59": [0.65, 0.12, 0.12, 0.05, 0.02, 0.02, 0.02],
    "60-79": [0.40, 0.18, 0.22, 0.10, 0.07, 0.01, 0.02],
    "80+": [0.25, 0.22, 0.25, 0.15, 0.11, 0.01, 0.01],
}
_DX_NAMES = ("nv", "mel", "bkl", "bcc", "akiec", "vasc", "df")
_SITES = ("back", "lower extremity", "trunk", "upper extremity", "abdomen", "face", "chest", "foot", "neck",
          "scalp", "hand", "ear")


@dataclass
class SkinSample:
    """One dermoscopy-like RGB image (uint8, H x W x 3) and its lesion mask (uint8, 255 = lesion)."""

    image: np.ndarray
    mask: np.ndarray
    age_group: str
    age: int
    lesion: int


def _lesion_params(rng: np.random.Generator, group: str) -> dict:
    look = AGE_LOOK[group]
    n_harm = 5
    return dict(
        radius=look["radius"] * rng.normal(1.0, 0.15),
        amps=rng.normal(0, look["irregular"], n_harm) / np.arange(1, n_harm + 1) ** 0.5,
        phases=rng.uniform(0, 2 * np.pi, n_harm),
        halo=float(np.clip(rng.normal(look["halo"], 0.03), 0.0, 0.5)),
        pigment=look["pigment"] * rng.normal(1.0, 0.12),
        variegation=look["variegation"],
        hue=rng.normal(0, 0.05, 3),
        skin=np.array([0.85, 0.66, 0.55]) * rng.uniform(0.75, 1.05) + rng.normal(0, 0.02, 3),
        sun=look["sun"],
    )


def _render(rng: np.random.Generator, p: dict, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Draw one view of a lesion; the view (rotation, shift, zoom, light) differs between images of a lesion."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    cy, cx = h / 2 + rng.normal(0, h * 0.05), w / 2 + rng.normal(0, w * 0.05)
    zoom, turn = rng.uniform(0.85, 1.15), rng.uniform(0, 2 * np.pi)
    dy, dx = yy - cy, xx - cx
    theta = np.arctan2(dy, dx) + turn
    border = 1.0 + sum(a * np.cos((k + 1) * theta + ph) for k, (a, ph) in enumerate(zip(p["amps"], p["phases"])))
    rho = np.hypot(dy, dx) / (p["radius"] * zoom * h * border)  # < 1 inside the annotated lesion

    core_edge = 1.0 / (1.0 + p["halo"])  # the strongly pigmented core ends inside the labelled boundary
    core = soft_step(rho, core_edge, 0.03)
    halo = soft_step(rho, 1.0, 0.05) - core  # faint periphery: part of the lesion, barely darker than skin
    patches = smooth_noise(rng, shape, h / 20)
    darkening = core * p["pigment"] * (1 + p["variegation"] * patches) + halo * 0.09 * p["pigment"] / 0.45

    lesion_colour = np.array([0.50, 0.78, 0.92]) + p["hue"]  # brown: blue and green darken more than red
    freckles = p["sun"] * 2.0 * np.clip(smooth_noise(rng, shape, h / 40) - 0.8, 0, None)  # solar lentigines
    image = p["skin"][None, None, :] * (1 - (darkening + freckles)[..., None] * lesion_colour[None, None, :])
    light = 1 - 0.25 * (np.hypot(yy - h / 2, xx - w / 2) / np.hypot(h / 2, w / 2)) ** 2  # dermoscope vignette
    image = image * light[..., None] * rng.uniform(0.92, 1.05) + rng.normal(0, 0.012, image.shape)
    image = np.clip(image * 255, 0, 255).astype(np.uint8)
    mask = np.where(rho < 1.0, 255, 0).astype(np.uint8)
    return image, mask


def make_skin(seed: int, age_group: str | None = None, shape: tuple[int, int] = (150, 200), lesion: int = 0,
              view: int = 0) -> SkinSample:
    """One deterministic lesion image; images of the same ``lesion`` share the lesion and differ in view."""
    if min(shape) < 32:
        raise SyntheticDataError(f"skin image shape {shape} is too small; use at least 32 x 32 pixels")
    rng = rng_for(seed, 2, lesion)
    if age_group is None:
        age_group = str(rng.choice(list(AGE_FREQUENCIES), p=list(AGE_FREQUENCIES.values())))
    if age_group not in AGE_LOOK:
        raise SyntheticDataError(f"age group {age_group!r} is not one of {list(AGE_GROUPS)}")
    age = int(rng.choice(_AGES[age_group]))
    params = _lesion_params(rng, age_group)
    image, mask = _render(rng_for(seed, 2, lesion, view + 1), params, tuple(shape))
    return SkinSample(image=image, mask=mask, age_group=age_group, age=age, lesion=lesion)


def _images_per_lesion(rng: np.random.Generator, n: int) -> list[int]:
    """Images per lesion as in HAM10000: most lesions once, some two to four times; totals exactly n."""
    counts: list[int] = []
    while sum(counts) < n:
        counts.append(int(rng.choice([1, 2, 3, 4], p=[0.72, 0.18, 0.07, 0.03])))
    counts[-1] -= sum(counts) - n
    return counts


def write_ham10000(out: str | Path, n: int = 500, seed: int = 0, shape: Sequence[int] = (150, 200),
                   frequencies: Mapping[str, float] | None = None) -> Path:
    """Write HAM10000_metadata.csv, ``<image_id>.jpg`` and ``<image_id>_segmentation.png`` for ``n`` images."""
    from PIL import Image  # Pillow writes the JPEG/PNG files the HAM10000 release uses

    freqs = check_frequencies(frequencies or AGE_FREQUENCIES, AGE_GROUPS)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = rng_for(seed, 102)  # lesion counts and groups
    counts = _images_per_lesion(rng, n)
    groups = allocate(len(counts), freqs, rng)
    rows, image_no = [], 0
    for lesion, (count, group) in enumerate(zip(counts, groups)):
        meta_rng = rng_for(seed, 2, lesion, 0)
        dx = str(meta_rng.choice(_DX_NAMES, p=_DX[group]))
        confirmed = dx in ("mel", "bcc", "akiec")  # malignant lesions are confirmed by histopathology
        dx_type = "histo" if confirmed else str(meta_rng.choice(["follow_up", "consensus", "histo"]))
        sex, site = str(meta_rng.choice(["male", "female"])), str(meta_rng.choice(_SITES))
        for view in range(count):
            sample = make_skin(seed, group, tuple(shape), lesion=lesion, view=view)
            image_id = f"ISIC_{image_no:07d}"
            atomic_write(out / f"{image_id}.jpg", lambda tmp: Image.fromarray(sample.image).save(tmp, quality=92))
            atomic_write(out / f"{image_id}_segmentation.png", lambda tmp: Image.fromarray(sample.mask).save(tmp))
            rows.append([f"HAM_{lesion:07d}", image_id, dx, dx_type, f"{float(sample.age):.1f}", sex, site])
            image_no += 1
    def write_table(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"])
            writer.writerows(rows)

    atomic_write(out / "HAM10000_metadata.csv", write_table)
    return out
