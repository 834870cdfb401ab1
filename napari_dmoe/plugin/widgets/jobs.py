"""Worker generators for the widgets (no Qt): load the model, run the inference engine, report steps.

They run in a napari thread worker. Every expected failure (bad file, bad image, bad attribute, missing
device) comes back as ``JobResult.error`` with the engine's message, so the widget shows it instead of a
traceback. Unexpected exceptions are logged with their traceback and reported the same way.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Generator, NamedTuple, Sequence

from napari_dmoe.inference.fit import FitError
from napari_dmoe.io.model_cache import ModelCache  # (the widgets' cache lives in the core)

log = logging.getLogger(__name__)


class Step(NamedTuple):
    """What the progress bar shows: a description and ``done`` of ``total``."""

    text: str
    done: int
    total: int


@dataclass
class JobResult:
    """The model used, the segmentations and their provenance by attribute tag, or an error message."""

    model: Any = None
    segmentations: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)  # tag -> inference.request.Provenance
    requests: dict[str, dict[str, str]] = field(default_factory=dict)
    error: str | None = None
    findings: list[Any] = field(default_factory=list)  # the fit check's, when it refused the image (FitError)


def run_sweep(model_path: str, request: Any, cache: ModelCache, attributes: Sequence[dict[str, str]]
              ) -> Generator[Step, None, JobResult]:
    """Segment the engine ``request`` (``inference.request.SegmentRequest``) under each attribute in turn
    (one attribute = a normal segment)."""
    result = JobResult()
    try:
        yield Step("loading model", 0, 1)
        from napari_dmoe.threads import apply_threads, sample

        before = sample()  # the load is measured while the model loads: no extra wait
        result.model = cache.get(model_path)
        apply_threads(since=before)  # the CPU-thread rule of every dmoe verb (napari_dmoe.threads), from the load now
        from napari_dmoe.generators import relay
        from napari_dmoe.inference.request import as_array, iter_run
        from napari_dmoe.model.spec import attribute_text

        request = dataclasses.replace(request, image=as_array(request.image))  # once, not per attribute
        for i, attribute in enumerate(attributes):
            tag = attribute_text(attribute)
            prefix = f"{tag} ({i + 1}/{len(attributes)})" if len(attributes) > 1 else tag
            gen = iter_run(result.model, dataclasses.replace(request, attribute=dict(attribute)))
            # on cancel (GeneratorExit here) relay closes gen and the engine puts the network back
            done = yield from relay(gen, lambda p: Step(f"{prefix}: {p.stage}", p.done, p.total))
            result.segmentations[tag], result.provenance[tag] = done.segmentation, done.provenance
            result.requests[tag] = dict(attribute)
    except FitError as err:
        result.error = str(err.hint("press Segment anyway to segment it regardless"))
        result.findings = list(err.findings)
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
