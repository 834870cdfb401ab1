"""The one evaluation loop: segment each case with the inference engine and score it against its label.

``dmoe evaluate`` (``evaluation.evaluate``), validation of 3D models during training (``training.validate``) and
the fine-tune before/after comparison (``finetune.compare``) all call ``evaluate_cases``, so a case is segmented
exactly as the Segment widget would segment it (raw image, its voxel size, the model's resampling, windows and
normalisation) and scored with the same metrics. Only where the cases come from differs: a dataset split
(``dataset_cases``), or a fine-tune CSV (built by the caller as ``Case`` objects).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_dmoe.evaluation.metrics import PerImage, evaluate_image

__all__ = ["Case", "Evaluation", "evaluate_cases", "dataset_cases", "case_from_item"]


@dataclass
class Case:
    """One image to evaluate, in napari's layout: ``(y, x)``, ``(y, x, C)`` when ``rgb``, or ``(z, y, x)``."""

    id: str
    group: str
    image: np.ndarray
    label: np.ndarray
    attribute: dict[str, str]
    spacing: tuple[float, ...] | None = None  # the file's voxel size; None when it states none
    rgb: bool = False


@dataclass
class Evaluation:
    """Per-image records, and for MoE models (routing kept) each case's mean gate weight per expert by group."""

    records: list[PerImage] = field(default_factory=list)
    usage: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def usage_matrix(self) -> tuple[list[str], np.ndarray] | None:
        """Groups (sorted) and their mean expert usage ``[groups, experts]``; None without routing maps."""
        if not self.usage:
            return None
        groups = sorted(self.usage)
        return groups, np.stack([np.mean(self.usage[g], axis=0) for g in groups])


def case_from_item(item: Mapping[str, Any], attribute: Mapping[str, str],
                   spacing: tuple[float, ...] | None) -> Case:
    """A dataset item (``image`` channel-first ``[C, *spatial]``, ``label``, ``id``, ``group``) as a Case.

    Three or four channels are a colour axis (moved last, as napari holds it); otherwise the first channel."""
    image = np.asarray(item["image"])
    rgb = image.shape[0] in (3, 4)
    image = np.moveaxis(image, 0, -1) if rgb else image[0]
    return Case(str(item["id"]), str(item["group"]), image, np.asarray(item["label"]), dict(attribute), spacing,
                rgb)


def dataset_cases(ds: Any, indices: Iterable[int] | None = None) -> Iterator[Case]:
    """Every case of a ``datasets`` dataset (or those at ``indices``) on the file's own grid and voxel size (no
    resize, no resampling)."""
    for index in range(len(ds.records)) if indices is None else indices:
        item, spacing = ds.read(index, resample=False)
        yield case_from_item(item, dict(zip(ds.vocab.names, ds.records[index].values)), spacing)


def evaluate_cases(model: Any, cases: Iterable[Case], *, hd95: bool = True,
                   progress: Callable[[int, Case], None] | None = None, **segment_options: Any) -> Evaluation:
    """Segment each case with ``inference.segment(model, ...)`` and score it (Dice, IoU, HD95 unless ``hd95``
    is False). ``segment_options`` go to the engine (device, overlap, amp, routing...); ``progress(i, case)`` is
    called after each case. An input the engine refuses raises its ``InferenceError`` naming the case."""
    from napari_dmoe.inference.engine import InferenceError, segment

    spec = model.spec
    result = Evaluation()
    for index, case in enumerate(cases):
        try:
            seg = segment(model, case.image, case.attribute, spacing=case.spacing, rgb=case.rgb, **segment_options)
        except InferenceError as err:
            raise InferenceError(f"case {case.id!r}: {err}") from None
        result.records.append(evaluate_image(case.id, case.group, seg.labels, case.label, spec.n_classes,
                                             case.spacing, spec.class_names, hd95=hd95))
        if seg.routing:
            mean = np.asarray(seg.routing["mean"], dtype=np.float64)
            result.usage.setdefault(case.group, []).append(mean.reshape(mean.shape[0], -1).mean(axis=1))
        if progress is not None:
            progress(index, case)
    return result
