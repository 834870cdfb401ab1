"""What the dMoE Segment module does, in plain Python (numpy and napari-dmoe's client): tested in CI without Slicer.

The Slicer shell (``DMoESegment.py``) reads nodes into a ``VolumeInput`` and writes the ``Outputs`` back as nodes;
everything between is here:
- ``build_request``: the volume's array and geometry as the server wants them. The parent transform is a matrix
  (``parent_to_world``) composed with IJK-to-RAS, so a registered volume is segmented where it is shown; a
  one-slice volume goes as a 2D image (a photo is not a volume, and needs no "force").
- ``SegmentJob``: the request in a background thread, with ``poll``, elapsed time and ``cancel`` (which closes the
  connection: the server drops the work).
- ``outputs``: the reply as per-class segments, a dominant-expert label map whose values are expert + 1 (so expert 0
  is not Slicer's transparent label 0) with its colour table, and one scalar volume per expert (window 0-1).
- ``error_text``: every failure as one line for a dialog.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
EXPERT_COLORMAP = "vtkMRMLColorTableNodeFileViridis.txt"  # Slicer's built-in perceptual colour map
WINDOW = (0.0, 1.0)  # gate weights are fractions: every expert volume is shown on the same scale
ORTHONORMAL_TOL = 1e-3


class LogicError(ValueError):
    """Something the user can fix (a transform, a volume), said in one line."""


def load_leaf(name: str) -> Any:
    """A standalone napari-dmoe module (``client`` or ``colors``) without napari-dmoe installed in Slicer: the
    checkout's own file (slicer/DMoESegment/DMoESegmentLib -> napari_dmoe/NAME.py), else a copy beside the module
    (``dmoe_NAME.py``), else an installed napari_dmoe."""
    key = f"dmoe_{name}"
    if key in sys.modules:
        return sys.modules[key]
    module_dir = os.path.dirname(HERE)
    for path in (os.path.join(module_dir, os.pardir, os.pardir, "napari_dmoe", f"{name}.py"),
                 os.path.join(module_dir, f"dmoe_{name}.py")):
        if os.path.isfile(path):
            spec = importlib.util.spec_from_file_location(key, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[key] = module  # dataclasses look their module up while it is being defined
            spec.loader.exec_module(module)
            return module
    return importlib.import_module(f"napari_dmoe.{name}")  # pip-installed into Slicer's Python


# -- request --------------------------------------------------------------------------------------------------
@dataclass
class VolumeInput:
    """What the shell reads from a volume node."""

    array: np.ndarray  # slicer.util.arrayFromVolume: (k, j, i), or (k, j, i, c) for a vector (colour) volume
    ijk_to_ras: np.ndarray  # 4x4, the node's own
    parent_to_world: np.ndarray | None = None  # 4x4 of a linear parent transform; None without one
    name: str = "volume"
    modality: str | None = None


@dataclass
class Request:
    image: np.ndarray
    spacing: list[float]
    origin: list[float] | None
    direction: list[list[float]] | None
    rgb: bool
    modality: str | None
    two_d: bool  # sent as (y, x): the reply gets its slice axis back in ``outputs``


def build_request(volume: VolumeInput) -> Request:
    """The array and its world geometry as the client sends them (napari order: spacing, origin, direction)."""
    client = load_leaf("client")
    array = np.asarray(volume.array)
    rgb = array.ndim == 4
    if array.ndim not in (3, 4) or (rgb and array.shape[-1] not in (3, 4)):
        raise LogicError(f"volume {volume.name!r} has shape {array.shape}: expected (k, j, i) or a colour "
                         "volume (k, j, i, 3|4)")
    matrix = np.asarray(volume.ijk_to_ras, dtype=float).reshape(4, 4)
    if volume.parent_to_world is not None:
        matrix = np.asarray(volume.parent_to_world, dtype=float).reshape(4, 4) @ matrix
    if not np.allclose(matrix[3], [0, 0, 0, 1]):
        raise LogicError(f"volume {volume.name!r}: its transform is not affine; harden it or remove it")
    try:
        spacing, origin, direction = client.geometry_from_ijk_to_ras(matrix)
    except ValueError as err:
        raise LogicError(f"volume {volume.name!r}: {err}") from None
    d = np.asarray(direction)
    if np.abs(d @ d.T - np.eye(3)).max() > ORTHONORMAL_TOL:
        raise LogicError(f"volume {volume.name!r}: its transform shears it, so its voxels have no single size; "
                         "resample the volume (Resample Scalar/Vector/DWI Volume) or use a rigid transform")
    if array.shape[0] == 1:  # one slice: an image; the server checks it as 2D, like dmoe segment on a PNG
        return Request(np.ascontiguousarray(array[0]), spacing[1:], None, None, rgb, volume.modality, True)
    return Request(array, spacing, origin, direction, rgb, volume.modality, False)


# -- background job -------------------------------------------------------------------------------------------
class SegmentJob:
    """``client.segment`` in a background thread. The shell calls ``poll()`` from a timer (Slicer's main thread
    stays free) and ``cancel()`` from its button. States: running, done, failed, cancelled."""

    def __init__(self, url: str, token: str | None, model_id: str, request: Request,
                 attribute: Any = None, routing: bool = False, force: bool = False,
                 timeout: float | None = None) -> None:
        client = load_leaf("client")
        self._client = client.Client(url, token or None, timeout=timeout)  # one per job: cancel aborts it
        self._cancelled_type = client.Cancelled
        self.model_id, self.request = model_id, request
        self._kwargs = {"attribute": attribute, "routing": routing, "force": force}
        self.state, self.result, self.error = "idle", None, None
        self.started = 0.0
        self._thread: threading.Thread | None = None

    def start(self) -> "SegmentJob":
        self.state, self.started = "running", time.monotonic()
        self._thread = threading.Thread(target=self._run, name="dmoe-segment", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        r = self.request
        try:
            result = self._client.segment(self.model_id, r.image, spacing=r.spacing, origin=r.origin,
                                          direction=r.direction, rgb=r.rgb, modality=r.modality, **self._kwargs)
        except self._cancelled_type:
            self.state = "cancelled"
        except BaseException as err:  # noqa: BLE001 - every failure reaches the dialog, none the console
            self.error, self.state = err, ("cancelled" if self.state == "cancelling" else "failed")
        else:
            self.result, self.state = result, ("cancelled" if self.state == "cancelling" else "done")

    def poll(self) -> str:
        return self.state

    @property
    def sent(self) -> bool:
        """True once the request's body is with the server (it is working on it)."""
        return self._client.stage == "waiting"

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started if self.started else 0.0

    def progress_text(self) -> str:
        if self.state == "running":  # the client's stage: preparing (encoding, token check), sending, waiting
            what = {"sending": "Sending the volume", "waiting": "Waiting for the server"}.get(
                self._client.stage, "Preparing the request")
        else:
            what = {"cancelling": "Cancelling"}.get(self.state, self.state)
        return f"{what}... {self.elapsed:.0f} s"

    def cancel(self) -> None:
        if self.state == "running":
            self.state = "cancelling"
            self._client.abort()

    def wait(self, timeout: float | None = None) -> str:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.state


# -- outputs --------------------------------------------------------------------------------------------------
@dataclass
class Outputs:
    """What the shell turns into nodes, every array on the volume's own (k, j, i) grid."""

    labels: np.ndarray
    segments: list[tuple[int, str, tuple[float, float, float]]]  # (label value, name, colour)
    dominant: np.ndarray | None = None  # uint8: expert e is e + 1; 0 only where no expert was recorded
    expert_colors: list[tuple[int, str, tuple[float, float, float]]] = field(default_factory=list)
    experts: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (name, float32 mean gate weight)
    window: tuple[float, float] = WINDOW
    colormap: str = EXPERT_COLORMAP


def outputs(result: Any, request: Request) -> Outputs:
    """The server's reply as segments, the dominant-expert label map and one scalar volume per expert."""
    colors = load_leaf("colors")

    def grid(array: np.ndarray) -> np.ndarray:
        return array[None] if request.two_d else array

    labels = grid(np.asarray(result.labels))
    out = Outputs(labels=labels, segments=colors.segment_table(result.class_names))
    mean = (result.routing or {}).get("mean")
    if result.dominant_expert is not None and mean is not None:
        n = int(mean.shape[0])
        out.dominant = grid(np.asarray(result.dominant_expert).astype(np.uint8) + 1)
        out.expert_colors = [(e + 1, f"expert {e}", colors.SEGMENT_COLORS[e % len(colors.SEGMENT_COLORS)])
                             for e in range(n)]
        out.experts = [(f"expert {e}", grid(np.asarray(mean[e], dtype=np.float32))) for e in range(n)]
    return out


# -- words ----------------------------------------------------------------------------------------------------
HINTS = {401: "check the token (the one `dmoe serve` was started with)",
         404: "press Connect again: the server's models changed",
         413: "the volume is larger than the server takes: crop or resample it, or raise the server's limits",
         422: "tick 'Segment even if the volume does not fit' if you are sure it suits the model",
         503: "the server is busy: try again in a moment"}


def error_text(err: BaseException) -> str:
    """One line for an error dialog: the server's or the client's message, with what to do when known."""
    # by class name, not identity: the client may be loaded twice (a module reload, or by path beside the package)
    kinds = {cls.__name__ for cls in type(err).__mro__}
    if "ServerError" in kinds:
        status, message = int(getattr(err, "status", 0)), str(getattr(err, "server_message", err))
        hint = HINTS.get(status)
        fit = status == 422 and "does not fit" in message
        return f"The server refused the request ({status}): {message}" + (
            f" ({hint})" if hint and (status != 422 or fit) else "")
    if kinds & {"ClientError", "LogicError"}:
        return str(err)
    return f"Unexpected error ({type(err).__name__}): {err}"


def summary(result: Any) -> str:
    used = result.attribute if isinstance(result.attribute, str) else ", ".join(
        f"{k}={v}" for k, v in (result.attribute or {}).items())
    seconds = sum((result.timings or {}).values())
    notes = "; ".join(result.warnings)
    return f"Done on {result.device} in {seconds:.1f} s ({used})" + (f". Note: {notes}" if notes else "")


def result_names(volume_name: str, model_id: str) -> dict[str, str]:
    base = f"{volume_name} dMoE {model_id}"
    return {"segmentation": base, "dominant": f"{base} dominant expert", "experts": f"{base} expert"}


def attribute_request(choices: dict[str, str]) -> Any:
    return load_leaf("client").attribute_request(choices)


def describe_model(info: dict[str, Any]) -> str:
    return load_leaf("client").describe_model(info)


def list_models(url: str, token: str | None, timeout: float = 20.0) -> list[dict[str, Any]]:
    return load_leaf("client").Client(url, token or None, timeout=timeout).list_models()


def unknown_value() -> str:
    return load_leaf("client").UNKNOWN


def matrix_to_array(get_element: Any) -> np.ndarray:
    """A vtkMatrix4x4's ``GetElement`` -> a numpy 4x4 (the shell passes the bound method)."""
    return np.array([[get_element(r, c) for c in range(4)] for r in range(4)], dtype=float)
