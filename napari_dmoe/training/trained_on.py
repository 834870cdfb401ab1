"""The "trained on" record of a model (``ModelSpec.trained_on``): what its training images looked like.

Inference compares every image with it (``inference.fit.check_fit``) so that a model is not run silently on an
image unlike anything it saw. Cheap by design: a seeded sample of at most ``max_cases`` training cases, each read
as the dataset reads it (raw intensities, before resampling and normalisation), at most ~200k voxels of each
taken on a regular stride.

``feature_record`` adds what the trained network itself makes of its training images (``inference.ood``): the
Mahalanobis statistics of its encoder features on a seeded sample of the training split and the threshold set on
the validation split (held-out images of the training sites). It depends on the weights, so it is computed for
each saved model (``setup.RunParts.spec_for``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from napari_dmoe.transforms import intensity_stats

MAX_CASES = 32
MAX_FEATURE_CASES = 256  # training images that enter the feature statistics (seeded sample)
MAX_HELDOUT_CASES = 128  # validation images that set the threshold
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


def _sample(n: int, most: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(n, size=min(n, most), replace=False).tolist()) if n else []


def case_image(ds: Any, index: int) -> tuple[np.ndarray, Any, bool]:
    """(image in napari layout, voxel size, rgb) of a dataset case as read from its file (``case_from_item``'s
    rule: 3 or 4 channels are colour, moved last)."""
    image, _, spacing = ds.load(ds.records[index])
    rgb = image.shape[0] in (3, 4)
    return (np.moveaxis(image, 0, -1) if rgb else image[0]), spacing, rgb


def feature_record(network: Any, spec: Any, train_ds: Any, val_ds: Any | None, seed: int = 0,
                   max_train: int = MAX_FEATURE_CASES, max_heldout: int = MAX_HELDOUT_CASES) -> dict[str, Any] | None:
    """``trained_on["features"]`` of ``network``: its features on a seeded sample of ``train_ds`` and a threshold
    from held-out images (``val_ds`` and cross-fitted training images); None when the network's feature layers
    are unknown or there are too few training images."""
    from types import SimpleNamespace

    from napari_dmoe.inference.ood import describe_features

    model = SimpleNamespace(spec=spec, network=network)
    train = (case_image(train_ds, i) for i in _sample(len(train_ds), max_train, seed))
    n_val = len(val_ds) if val_ds is not None else 0
    heldout = (case_image(val_ds, i) for i in _sample(n_val, max_heldout, seed + 1))
    return describe_features(model, train, heldout)


def scale_record(network: Any, spec: Any, train_ds: Any, seed: int = 0) -> dict[str, Any] | None:
    """``trained_on["scale"]`` of a 2D ``network``: the median foreground radius it segments on a seeded sample of
    ``train_ds`` (``inference.scale.REFERENCE_CASES`` images), the reference of a site calibration."""
    from types import SimpleNamespace

    from napari_dmoe.inference.scale import REFERENCE_CASES, reference_record

    if spec.spatial_dims != 2:
        return None
    images = (case_image(train_ds, i) for i in _sample(len(train_ds), REFERENCE_CASES, seed))
    return reference_record(SimpleNamespace(spec=spec, network=network), ((im, rgb) for im, _, rgb in images))
