"""Worker generators for the widgets (no Qt): load the model, run the inference engine, report steps.

They run in a napari thread worker. Every expected failure (bad file, bad image, bad attribute, missing
device) comes back as ``JobResult.error`` with the engine's message, so the widget shows it instead of a
traceback. Unexpected exceptions are logged with their traceback and reported the same way.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Generator, NamedTuple, Sequence

import numpy as np

from napari_dmoe.io.model_cache import ModelCache  # (the widgets' cache lives in the core)

log = logging.getLogger(__name__)


class Step(NamedTuple):
    """What the progress bar shows: a description and ``done`` of ``total``."""

    text: str
    done: int
    total: int


@dataclass
class SegmentRequest:
    """One job as captured in the GUI thread at launch."""

    model_path: str
    data: Any  # the layer's data (numpy, dask, ...); turned into numpy inside the worker
    attribute: dict[str, str]
    options: dict[str, Any] = field(default_factory=dict)  # keywords for iter_segment


@dataclass
class JobResult:
    """The model used and the segmentations by attribute tag, or an error message."""

    model: Any = None
    segmentations: dict[str, Any] = field(default_factory=dict)
    requests: dict[str, dict[str, str]] = field(default_factory=dict)
    error: str | None = None


def _as_array(data: Any) -> np.ndarray:
    if isinstance(data, (list, tuple)):  # a multiscale layer: segment the full-resolution level
        data = data[0]
    return np.asarray(data)


def run_sweep(request: SegmentRequest, cache: ModelCache, attributes: Sequence[dict[str, str]]
              ) -> Generator[Step, None, JobResult]:
    """Segment the same image under each attribute request in turn (one request = a normal segment)."""
    result = JobResult()
    try:
        yield Step("loading model", 0, 1)
        result.model = cache.get(request.model_path)
        image = _as_array(request.data)
        from napari_dmoe.generators import relay
        from napari_dmoe.model.spec import attribute_text
        from napari_dmoe.inference.engine import iter_segment

        for i, attribute in enumerate(attributes):
            tag = attribute_text(attribute)
            prefix = f"{tag} ({i + 1}/{len(attributes)})" if len(attributes) > 1 else tag
            value = attribute if len(attribute) > 1 else next(iter(attribute.values()))
            gen = iter_segment(result.model, image, value, **request.options)
            # on cancel (GeneratorExit here) relay closes gen and the engine puts the network back
            result.segmentations[tag] = yield from relay(gen, lambda p: Step(f"{prefix}: {p.stage}", p.done, p.total))
            result.requests[tag] = dict(attribute)
    except ValueError as err:  # InferenceError, CheckpointError, SpecError, DeviceError: messages for users
        result.error = str(err)
    except Exception as err:  # a bug: keep the viewer alive, log the traceback for the report
        log.exception("napari-dmoe job failed")
        result.error = f"unexpected {type(err).__name__}: {err} (see the terminal for the traceback)"
    return result


def advance(pbar: Any, step: Step) -> None:
    """Show ``step`` on a napari progress bar (``None`` once the job has finished: queued steps are ignored)."""
    if pbar is None:
        return
    if pbar.total != step.total:
        pbar.total = step.total
    pbar.set_description(f"dMoE {step.text}")
    pbar.n = 0
    pbar.update(step.done)
