"""3D prostate-like CT volumes (like radiotherapy planning CT) whose target depends on the T stage.

The label is the clinical target volume (CTV), drawn as radiotherapy guidelines do per stage: T1 the gland,
T2 the gland and the proximal 10 mm of the seminal vesicles, T3 the gland and the whole vesicles with a 3 mm
margin for extracapsular spread, T4 that plus the invaded neighbour within 15 mm (bladder base or anterior rectal
wall). The image shows the stage only faintly (slightly denser, fuller vesicles for T3/T4; a thin wall
thickening where T4 invades), so the anatomy alone does not fix the extent of the target.

Arrays are in NIfTI order (x, y, z) with a RAS+ affine (nibabel's convention: +x Right, +y Anterior,
+z Superior), already canonical so every reader sees the same array; `napari_order` gives the (z, y, x)
view that napari and `napari_dmoe.datasets.read_image` use.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from napari_dmoe.io.files import atomic_write
from napari_dmoe.synthetic.common import SyntheticDataError, allocate, check_frequencies, rng_for

STAGES = ("T1", "T2", "T3", "T4")
STAGE_FREQUENCIES = {"T1": 0.10, "T2": 0.40, "T3": 0.40, "T4": 0.10}
HU = dict(air=-1000, fat=-95, muscle=50, prostate=42, vesicle=32, urine=8, wall=40, gas=-700, bone=700,
          marrow=250)
# Acquisition sites (scanner + clinic). "a" is the generator the demo models were trained on (neutral values keep
# it bit-identical); "b" is another CT: a HU calibration offset, noisier and softer reconstruction, looser patient
# set-up, and a referral population with more advanced stages. Same contouring guideline at both sites.
SITES = {
    "a": dict(hu_offset=0.0, noise=22.0, blur=0.8, setup=4.0, frequencies=STAGE_FREQUENCIES),
    "b": dict(hu_offset=18.0, noise=40.0, blur=1.3, setup=8.0,
              frequencies={"T1": 0.05, "T2": 0.25, "T3": 0.40, "T4": 0.30}),
    # "c" (issue 25: headroom for a group-local fine-tune): a clinic that stages by palpation alone, so many of the
    # patients it records as T1 (the demo model's rarest stage) have tumours that reach the seminal vesicles: their
    # anatomy, and the target its radiation oncologists draw from the imaging, are those of T3. A mild scanner shift.
    "c": dict(hu_offset=8.0, noise=30.0, blur=1.0, setup=6.0,
              frequencies={"T1": 0.25, "T2": 0.35, "T3": 0.30, "T4": 0.10}, looks_like={"T1": "T3"}),
}


def _site(site: str) -> dict:
    if site not in SITES:
        raise SyntheticDataError(f"site {site!r} is not one of {list(SITES)}")
    return SITES[site]


@dataclass
class ProstateCase:
    """One CT-like volume (int16 HU, x/y/z order), its CTV label (uint8 0/1), geometry and stage."""

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    stage: str
    organs: dict[str, np.ndarray]

    def napari_order(self) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
        """Image, label and spacing in (z, y, x) order, as `napari_dmoe.datasets.read_image` returns them.

        The arrays are built in RAS+ voxel order (the affine written to NIfTI); the reader shows them in LPS+
        (radiological view: anterior up), so x and y are flipped here the same way.
        """
        flip = (slice(None, None, -1), slice(None, None, -1), slice(None))
        image, label = self.image[flip], self.label[flip]
        return (np.ascontiguousarray(image.transpose(2, 1, 0)), np.ascontiguousarray(label.transpose(2, 1, 0)),
                tuple(self.spacing[::-1]))


def _ellipsoid(grid: tuple[np.ndarray, ...], centre: Sequence[float], radii: Sequence[float],
               yaw: float = 0.0) -> np.ndarray:
    """Boolean ellipsoid on a mm grid, rotated by ``yaw`` radians about the z axis."""
    x, y, z = (g - c for g, c in zip(grid, centre))
    c, s = np.cos(yaw), np.sin(yaw)
    u, v = c * x + s * y, -s * x + c * y
    return (u / radii[0]) ** 2 + (v / radii[1]) ** 2 + (z / radii[2]) ** 2 < 1.0


def _within(mask: np.ndarray, mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Voxels within ``mm`` of ``mask`` (an isotropic dilation in physical units on an anisotropic grid)."""
    if not mask.any():
        return mask.copy()
    return ndimage.distance_transform_edt(~mask, sampling=spacing) <= mm


def make_prostate(seed: int, stage: str | None = None, shape: Sequence[int] = (96, 96, 32),
                  spacing: Sequence[float] = (2.0, 2.0, 3.0), index: int = 0, site: str = "a") -> ProstateCase:
    """One deterministic pelvis-like CT from acquisition ``site`` (SITES) with its stage-dependent CTV; ``stage``
    None draws it from the site's stage shares."""
    shape, spacing = tuple(int(s) for s in shape), tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < 8:
        raise SyntheticDataError(f"volume shape {shape} must have three sizes of at least 8 voxels")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise SyntheticDataError(f"spacing {spacing} must be three positive sizes in mm")
    acq = _site(site)
    rng = rng_for(seed, 3, index) if site == "a" else rng_for(seed, 3, index, 1 + list(SITES).index(site))
    if stage is None:
        stage = str(rng.choice(list(acq["frequencies"]), p=list(acq["frequencies"].values())))
    if stage not in STAGES:
        raise SyntheticDataError(f"stage {stage!r} is not one of {list(STAGES)}")
    drawn = acq.get("looks_like", {}).get(stage, stage)  # the disease as it is; ``stage`` as the site records it
    origin = -(np.array(shape) - 1) / 2 * np.array(spacing)
    axes = [o + np.arange(n, dtype=np.float32) * s for o, n, s in zip(origin, shape, spacing)]
    grid = np.meshgrid(*axes, indexing="ij", sparse=True)
    x, y, z = grid
    shift = rng.normal(0, acq["setup"], 3)  # patient set-up varies a little
    size = lambda: rng.normal(1.0, 0.1)  # noqa: E731 - per-organ size factor

    # body: skin ellipse with subcutaneous fat, muscle inside, pelvic fat around the organs
    body = ((x - shift[0]) / 170) ** 2 + ((y - shift[1] + 5) / rng.uniform(95, 110)) ** 2 < 1
    inner = ((x - shift[0]) / 145) ** 2 + ((y - shift[1] + 5) / rng.uniform(70, 82)) ** 2 < 1
    pelvic_fat = ((x - shift[0]) / 62) ** 2 + ((y - shift[1]) / 52) ** 2 < 1
    hu = np.full(shape, HU["air"], np.float32)
    hu[np.broadcast_to(body, shape)] = HU["fat"]
    hu[np.broadcast_to(inner, shape)] = HU["muscle"]
    hu[np.broadcast_to(pelvic_fat, shape)] = HU["fat"]

    c = lambda dx, dy, dz: (shift[0] + dx, shift[1] + dy, shift[2] + dz)  # noqa: E731 - organ centre in mm
    for side in (-1, 1):  # obturator muscles, femoral heads, pubic rami
        hu[_ellipsoid(grid, c(side * 62, 0, -15), (9, 30, 40))] = HU["muscle"]
        head = _ellipsoid(grid, c(side * 92, 8, -22), (24, 24, 24))
        hu[head] = HU["bone"]
        hu[_ellipsoid(grid, c(side * 92, 8, -22), (20, 20, 20))] = HU["marrow"]
        hu[_ellipsoid(grid, c(side * 14, 55, -30), (16, 9, 22), yaw=side * 0.3)] = HU["bone"]
    hu[_ellipsoid(grid, c(0, -72, 20), (32, 12, 45))] = HU["bone"]  # sacrum
    hu[_ellipsoid(grid, c(0, -72, 20), (27, 8, 42))] = HU["marrow"]

    bladder_r = np.array([36, 27, 26]) * rng.uniform(0.75, 1.2)
    bladder = _ellipsoid(grid, c(0, 22, 30), bladder_r)
    bladder_lumen = _ellipsoid(grid, c(0, 22, 30), bladder_r - 3)
    rectum_r = rng.uniform(11, 15)
    rectum = ((x - shift[0]) / rectum_r) ** 2 + ((y - shift[1] + 24) / rectum_r) ** 2 < 1
    rectum = np.broadcast_to(rectum, shape) & np.broadcast_to(z < shift[2] + 45, shape)
    rectum_lumen = _ellipsoid(grid, c(0, -25, 0), (rectum_r - 4, rectum_r - 5, 60))
    prostate = _ellipsoid(grid, c(0, 4, -16), np.array([21, 15, 17]) * size())
    sv_scale = rng.normal(1.0, 0.1) * (1.12 if drawn in ("T3", "T4") else 1.0)  # fuller when invaded
    vesicles = np.zeros(shape, bool)
    for side in (-1, 1):
        vesicles |= _ellipsoid(grid, c(side * 17, -7, 6), np.array([17, 5, 7]) * sv_scale, yaw=side * 0.45)
    vesicles &= ~bladder & ~rectum

    hu[bladder] = HU["wall"]
    hu[bladder_lumen] = HU["urine"]
    hu[rectum] = HU["wall"]
    hu[rectum_lumen] = HU["gas"] if rng.random() < 0.5 else 20  # gas or stool
    hu[vesicles] = HU["vesicle"] + (6 if drawn in ("T3", "T4") else 0)
    hu[prostate] = HU["prostate"]

    ctv = _ctv(drawn, prostate, vesicles, bladder, bladder_lumen, rectum, rectum_lumen, hu, y > shift[1] - 24,
               spacing, rng)
    ctv &= np.broadcast_to(body, shape)

    image = _acquire(hu, acq, spacing, rng)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    organs = {"prostate": prostate, "vesicles": vesicles, "bladder": bladder, "rectum": rectum}
    return ProstateCase(image=image, label=ctv.astype(np.uint8), spacing=spacing, affine=affine, stage=stage,
                        organs=organs)


def _ctv(stage: str, prostate: np.ndarray, vesicles: np.ndarray, bladder: np.ndarray, bladder_lumen: np.ndarray,
         rectum: np.ndarray, rectum_lumen: np.ndarray, hu: np.ndarray, anterior: np.ndarray,
         spacing: tuple[float, ...], rng: np.random.Generator) -> np.ndarray:
    """The CTV by stage (the fairness design: the extent follows the stage, the image only hints at it); marks
    T4 invasion in ``hu``. ``anterior``: the half of the pelvis in front of the rectum's back wall."""
    ctv = prostate.copy()
    if stage == "T2":
        ctv |= vesicles & _within(prostate, 10.0, spacing)
    if stage in ("T3", "T4"):
        ctv = _within(prostate | vesicles, 3.0, spacing) & ~bladder_lumen & ~rectum_lumen
    if stage == "T4":
        near = _within(prostate | vesicles, 15.0, spacing)
        if rng.random() < 0.6:  # bladder base: the tumour grows into the lumen; the image shows a thin rim
            invaded = bladder & near
            hu[invaded & bladder_lumen & _within(bladder & ~bladder_lumen, 3.0, spacing)] = HU["wall"] + 6
        else:  # anterior rectal wall: slightly denser wall, lumen spared
            invaded = rectum & ~rectum_lumen & near & np.broadcast_to(anterior, hu.shape)
            hu[invaded] = HU["wall"] + 6
        ctv |= invaded
    return ctv


def _acquire(hu: np.ndarray, acq: Mapping[str, float], spacing: tuple[float, ...],
             rng: np.random.Generator) -> np.ndarray:
    """The scanner: partial volume blur, correlated CT noise and the site's calibration offset, as int16 HU."""
    hu = ndimage.gaussian_filter(hu, sigma=[acq["blur"] / s * min(spacing) for s in spacing])
    hu += ndimage.gaussian_filter(rng.normal(0, acq["noise"], hu.shape).astype(np.float32), 0.6)
    hu += acq["hu_offset"]
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16)


def write_prostate(out: str | Path, n: int = 60, seed: int = 0, shape: Sequence[int] = (96, 96, 32),
                   spacing: Sequence[float] = (2.0, 2.0, 3.0), frequencies: Mapping[str, float] | None = None,
                   site: str = "a") -> Path:
    """Write ``images/<case>.nii.gz``, ``labels/<case>.nii.gz`` and ``attributes.csv`` (case_id, stage).

    ``site`` picks the acquisition site (SITES); ``frequencies`` defaults to that site's stage shares."""
    import nibabel as nib  # nibabel writes the NIfTI header (affine, units) the way every tool reads it

    freqs = check_frequencies(frequencies or _site(site)["frequencies"], STAGES)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    stages = allocate(n, freqs, rng_for(seed, 103))
    rows = []
    for i, stage in enumerate(stages):
        case = make_prostate(seed, stage, shape, spacing, index=i, site=site)
        case_id = f"case_{i:04d}"
        for folder, data in (("images", case.image), ("labels", case.label)):
            img = nib.Nifti1Image(data, case.affine)
            img.set_qform(case.affine, code=1)  # scanner coordinates, like a converted CT
            img.set_sform(case.affine, code=1)
            img.header.set_xyzt_units("mm", "sec")
            atomic_write(out / folder / f"{case_id}.nii.gz", lambda tmp: nib.save(img, tmp))
        rows.append([case_id, stage])
    def write_table(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["case_id", "stage"])
            writer.writerows(rows)

    atomic_write(out / "attributes.csv", write_table)
    return out
