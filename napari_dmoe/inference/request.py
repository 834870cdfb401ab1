"""The one request every front end sends the engine, and the one result it gets back.

The Segment widget, its remote mode, ``dmoe segment``, ``dmoe serve`` and scripts all build a ``SegmentRequest``
(the image, its geometry, the patient attribute, whether to segment an image that does not fit the model, and
the engine options as one ``EngineSettings``) and call ``iter_run`` (or ``run``). The result carries the labels
and routing maps and a ``Provenance``: which model, which attribute, what was forced and why, so a saved mask
can say how it was made. The server and the widget's remote mode send the same request over the wire
(``to_wire`` / ``from_wire``), so the mask a server returns is the one the local engine would give.

The pattern is napari-nninteractive's session object: front ends hold no engine logic of their own.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generator, Mapping, Sequence

import numpy as np

from napari_dmoe.inference.plan import InferenceError, Progress
from napari_dmoe.model.routers import AttributeValueError, PatientAttribute

__all__ = ["EngineSettings", "Provenance", "SegmentRequest", "SegmentResult", "iter_run", "run"]

# options that travel over the wire; device, AMP, compile and memory layout are the server's own choice, and
# routing is the header's yes/no (a server returns the mean map and the dominant expert, or nothing)
WIRE_SETTINGS = ("overlap", "window_batch", "blend", "unknown", "mode2d", "zoom")


@dataclass(frozen=True)
class EngineSettings:
    """How the engine runs (not what it segments). Defaults are ``dmoe segment``'s, so every front end gives
    the same mask for the same file.

    Args:
        device: "auto", "cpu", "cuda", "cuda:N" or "mps".
        overlap: sliding-window overlap in [0, 1).
        window_batch: windows per forward pass.
        blend: "gaussian" or "constant" window blending.
        amp: mixed precision on CUDA.
        routing: "auto", "all", "mean" (the mean map over positions only) or "none".
        unknown: "average" over routers for unknown attribute values, or "error" to refuse them.
        mode2d: "auto", "resize" or "sliding" for 2D models.
        channels_last: channels-last memory layout (GPUs).
        compile: ``torch.compile`` the network.
        roi_size: window size; None uses the model's.
        zoom: 2D models: the site calibration (``inference.scale``), the image zoomed about its centre by this
            factor before the model and the results mapped back; 1 leaves the image as it is.
    """

    device: str = "auto"
    overlap: float = 0.25
    window_batch: int = 4
    blend: str = "gaussian"
    amp: bool = True
    routing: str = "auto"
    unknown: str = "average"
    mode2d: str = "auto"
    channels_last: bool = False
    compile: bool = False
    roi_size: tuple[int, ...] | None = None
    zoom: float = 1.0

    def engine_kwargs(self) -> dict[str, Any]:
        """The keywords of ``engine.iter_segment``."""
        return {"device": self.device, "overlap": self.overlap, "sw_batch_size": self.window_batch,
                "blend": self.blend, "amp": self.amp, "routing": self.routing, "unknown": self.unknown,
                "mode2d": self.mode2d, "channels_last": self.channels_last, "compile": self.compile,
                "roi_size": self.roi_size, "zoom": self.zoom}

    def to_dict(self, keys: Sequence[str] | None = None) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["roi_size"] = list(self.roi_size) if self.roi_size else None
        return {k: data[k] for k in (keys or data)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, keys: Sequence[str] | None = None) -> "EngineSettings":
        """Settings from a mapping (a wire header, saved widget settings); unknown or disallowed keys are refused."""
        data = dict(data or {})
        allowed = set(keys or (f.name for f in dataclasses.fields(cls)))
        extra = sorted(set(data) - allowed)
        if extra:
            raise InferenceError(f"unknown engine setting(s) {extra}; allowed: {sorted(allowed)}")
        for key, value in data.items():  # a client's JSON may say anything: the type is checked here, once
            kind = type(getattr(cls, key, None))
            if key == "roi_size":
                ok = value is None or (isinstance(value, (list, tuple)) and all(
                    isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))
            elif kind is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            elif kind is int:
                ok = isinstance(value, int) and not isinstance(value, bool)
            else:
                ok = isinstance(value, kind)
            if not ok:
                raise InferenceError(f"engine setting {key!r}: {value!r} is not a valid {kind.__name__}"
                                     if key != "roi_size" else f"engine setting 'roi_size': {value!r} is not a "
                                     "list of positive integers")
        if data.get("roi_size") is not None:
            data["roi_size"] = tuple(data["roi_size"])
        return cls(**data)


@dataclass
class SegmentRequest:
    """One image to segment.

    Args:
        image: (y, x), (y, x, C) colour, (z, y, x) or (z, y, x, C); any array-like (numpy, dask, a multiscale
            layer's list, whose first level is used).
        attribute: the patient attribute: None / "unknown", a value, a mapping name -> value, ``-a`` arguments or
            a ``PatientAttribute``; parsed against the model by ``iter_run``.
        spacing: mm per spatial axis in the image's order; None when unknown.
        rgb: the last axis is colour; None guesses.
        modality: what the image is (DICOM Modality, e.g. "CT"), when known; helps the fit check.
        force: segment even if the image does not fit the model's training data (recorded in the provenance).
        settings: how the engine runs.
        source: the image's name for messages and provenance (a file path, a layer name).
    """

    image: Any
    attribute: Any = None
    spacing: Sequence[float] | None = None
    rgb: bool | None = None
    modality: str | None = None
    force: bool = False
    settings: EngineSettings = field(default_factory=EngineSettings)
    source: str = "image"

    def to_wire(self, model_id: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The JSON header and arrays of a ``/segment`` message (``napari_dmoe.client``)."""
        attribute = self.attribute.mapping if isinstance(self.attribute, PatientAttribute) else self.attribute
        if isinstance(attribute, Mapping):
            attribute = {str(k): ("unknown" if v is None else str(v)) for k, v in attribute.items()}
        header = {"model": model_id, "attribute": attribute,
                  "spacing": None if self.spacing is None else [float(s) for s in self.spacing],
                  "rgb": self.rgb, "modality": self.modality, "force": bool(self.force),
                  "routing": self.settings.routing != "none", "settings": self.settings.to_dict(WIRE_SETTINGS)}
        return header, {"image": as_array(self.image)}

    @classmethod
    def from_wire(cls, header: Any, image: np.ndarray, settings: EngineSettings) -> "SegmentRequest":
        """The request a server runs: the wire's options on top of the server's own ``settings``."""
        wire = dict(getattr(header, "settings", None) or {})
        checked = EngineSettings.from_dict(wire, WIRE_SETTINGS)  # refuses keys and types a client may not send
        merged = dataclasses.replace(settings, **{k: getattr(checked, k) for k in wire},
                                     routing="mean" if header.routing else "none")
        return cls(image, header.attribute, header.spacing, header.rgb, header.modality, bool(header.force), merged,
                   source="the image")


@dataclass
class Provenance:
    """How a mask was made: kept in layer metadata and written into every saved format."""

    model: str
    attribute: dict[str, str]
    forced: bool
    fit_findings: list[str]
    device: str
    warnings: list[str] = field(default_factory=list)
    conversions: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def attribute_text(self) -> str:
        from napari_dmoe.model.spec import attribute_text

        return attribute_text(self.attribute)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SegmentResult:
    """The engine's ``Segmentation`` (labels, probabilities, routing maps on the input grid) and its provenance."""

    segmentation: Any
    provenance: Provenance

    @property
    def labels(self) -> np.ndarray:
        return self.segmentation.labels

    @property
    def routing(self) -> dict[str, np.ndarray]:
        return self.segmentation.routing


def as_array(data: Any) -> np.ndarray:
    """A layer's or caller's data as numpy (a multiscale list: its full-resolution level)."""
    if isinstance(data, (list, tuple)):
        data = data[0]
    return np.asarray(data)


def model_name(model: Any) -> str:
    """A model's name for provenance and messages: its file name, else its id."""
    path = str(getattr(model, "path", "") or "")
    return Path(path).name if path else str(getattr(model, "id", "") or "model")


def iter_run(model: Any, request: SegmentRequest) -> Generator[Progress, None, SegmentResult]:
    """Check the image against the model (refused with ``FitError`` unless ``request.force``), segment it,
    and return the result with its provenance. Yields the engine's progress; closing the generator cancels."""
    from napari_dmoe.inference.engine import iter_segment
    from napari_dmoe.inference.fit import FitError, check_fit

    spec = model.spec
    try:
        attribute = PatientAttribute.parse(request.attribute, spec)
    except AttributeValueError as err:
        raise InferenceError(str(err)) from None
    image = as_array(request.image)
    # the model, not its spec: a record of its features is checked on the image as the network sees it (ood.py)
    findings = check_fit(model, image, request.spacing, rgb=request.rgb, modality=request.modality)
    if findings and not request.force:
        raise FitError(request.source, findings, model_name(model))
    segmentation = yield from iter_segment(model, image, attribute.mapping, spacing=request.spacing,
                                           rgb=request.rgb, **request.settings.engine_kwargs())
    provenance = Provenance(
        model=model_name(model), attribute=dict(segmentation.attribute), forced=bool(findings),
        fit_findings=[f.message for f in findings], device=segmentation.device,
        warnings=list(segmentation.warnings), conversions=list(segmentation.conversions),
        settings=request.settings.to_dict())
    return SegmentResult(segmentation, provenance)


def run(model: Any, request: SegmentRequest) -> SegmentResult:
    """``iter_run`` drained."""
    from napari_dmoe.generators import drain

    return drain(iter_run(model, request))
