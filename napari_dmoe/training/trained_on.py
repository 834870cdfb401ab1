"""The "trained on" record of a model (``ModelSpec.trained_on``): what its training images looked like.

Inference compares every image with it (``inference.fit.check_fit``) so that a model is not run silently on an
image unlike anything it saw. Cheap by design: a seeded sample of at most ``max_cases`` training cases, each read
as the dataset reads it (raw intensities, before resampling and normalisation), at most ~200k voxels of each
taken on a regular stride.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from napari_dmoe.inference.fit import intensity_stats

MAX_CASES = 32
# the image kind a dataset format implies when the config does not say (data.modality)
FORMAT_MODALITY = {"fairseg": "fundus photo (SLO)", "ham10000": "dermoscopy"}


def describe_training_data(ds: Any, modality: str | None, max_cases: int = MAX_CASES, seed: int = 0
                           ) -> dict[str, Any]:
    """The trained_on record of a dataset (a ``datasets.base.SegmentationDataset``): modality as given, spatial
    dims and channels of its images, intensity statistics and the median voxel size over a seeded sample."""
    n = len(ds)
    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(n, size=min(n, max_cases), replace=False).tolist()) if n else []
    images, spacings = [], []
    channels = dims = None
    for i in picks:
        image, _, spacing = ds.load(ds.records[i])  # [C, *spatial], as read from the file
        channels, dims = int(image.shape[0]), image.ndim - 1
        images.append(image)
        if spacing is not None:
            spacings.append(spacing)
    stats = intensity_stats(images)
    if stats:
        stats["of_cases"] = n
    return {
        "modality": modality,
        "spatial_dims": dims,
        "channels": channels,
        "intensity": stats or None,
        "spacing": [round(float(s), 4) for s in np.median(np.asarray(spacings), axis=0)] if spacings else None,
    }
