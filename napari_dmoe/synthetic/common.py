"""Small shared helpers of the synthetic generators: seeding, group allocation, smooth noise."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage


class SyntheticDataError(ValueError):
    """A generator was asked for something it cannot make; the message says what to change."""


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    """A generator for one sample: independent of how many other samples are made."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), *[int(k) for k in keys]]))


def check_frequencies(freqs: Mapping[str, float], vocabulary: Sequence[str]) -> dict[str, float]:
    """Validate group frequencies (names from ``vocabulary``, non-negative, summing to 1 within 1e-6)."""
    unknown = sorted(set(freqs) - set(vocabulary))
    if unknown:
        raise SyntheticDataError(f"unknown group(s) {unknown}; expected names from {list(vocabulary)}")
    values = {g: float(freqs.get(g, 0.0)) for g in vocabulary}
    if any(v < 0 for v in values.values()) or abs(sum(values.values()) - 1.0) > 1e-6:
        raise SyntheticDataError(f"group frequencies {values} must be non-negative and sum to 1")
    return values


def allocate(n: int, freqs: Mapping[str, float], rng: np.random.Generator) -> list[str]:
    """Exactly ``round(n * f)`` samples per group (largest remainder), in a seeded random order.

    Exact counts rather than i.i.d. draws keep the rare groups present even in small sets.
    """
    if n < 0:
        raise SyntheticDataError(f"number of samples must be >= 0, got {n}")
    names = list(freqs)
    raw = np.array([freqs[g] * n for g in names])
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    groups = [g for g, c in zip(names, counts) for _ in range(c)]
    return [groups[i] for i in rng.permutation(n)]


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma: float | Sequence[float]) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to unit standard deviation (a cheap texture field)."""
    field = ndimage.gaussian_filter(rng.standard_normal(tuple(shape)).astype(np.float32), sigma, mode="reflect")
    return field / (field.std() + 1e-8)


def ellipse_field(shape: Sequence[int], centre: Sequence[float], radii: Sequence[float],
                  angle: float = 0.0) -> np.ndarray:
    """Normalised elliptic radius r (r < 1 inside) on a 2D pixel grid, rotated by ``angle`` radians."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    dy, dx = yy - centre[0], xx - centre[1]
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dy + s * dx, -s * dy + c * dx
    return np.sqrt((u / radii[0]) ** 2 + (v / radii[1]) ** 2)


def soft_step(r: np.ndarray, edge: float = 1.0, width: float = 0.05) -> np.ndarray:
    """1 inside ``r < edge``, 0 outside, with a smooth logistic edge of relative ``width``."""
    return 1.0 / (1.0 + np.exp(np.clip((r - edge) / max(width, 1e-6), -50, 50)))
