"""Client for ``dmoe serve``: segment on a remote (GPU) machine from napari, 3D Slicer or a script.

Standalone on purpose: the standard library and numpy only, no torch, no napari and no import from the rest of
``napari_dmoe``, so 3D Slicer's Python can load this one file by path (see slicer/README.md) and a laptop without
torch can drive a GPU box. The server imports the wire format from here, so both ends share one definition.

Wire format (both directions, ``application/x-dmoe``): the 4 bytes ``DMOE``, a little-endian uint32 header length
N, N bytes of UTF-8 JSON, then the arrays the header lists under ``"arrays"`` (name, dtype, shape), one after the
other as raw little-endian C-order bytes. Arrays are rebuilt with ``numpy.frombuffer``: nothing is ever unpickled.

Geometry, in napari's axis order like the rest of napari-dmoe: ``shape`` (z, y, x) or (y, x) (plus a trailing
colour axis for RGB); ``spacing`` mm per spatial axis in that order (None: unknown); ``origin`` the position of the
first voxel per axis; ``direction`` a square matrix whose row a is the unit vector of array axis a in the patient
frame, written in the same reversed (S, P, L) order as ``origin``. The identity (the default) is the axis-aligned
LPS view that napari-dmoe's reader gives. The server reorients other volumes to that view before segmenting (as
``dmoe segment`` sees a file) and returns every array in the geometry that was sent.
"""
from __future__ import annotations

import json
import struct
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

MAGIC = b"DMOE"
CONTENT_TYPE = "application/x-dmoe"
# plain numeric types only; everything travels little-endian
DTYPES = ("|b1", "|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f2", "<f4", "<f8")
MAX_HEADER_BYTES = 1 << 20


class ClientError(ValueError):
    """The server could not be reached or answered something that is not a dMoE reply."""


class ServerError(ClientError):
    """The server refused or failed the request; ``status`` is the HTTP status, the message the server's."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"server answered {status}: {message}")
        self.status = status
        self.server_message = message


class WireError(ValueError):
    """A message is not in the dMoE wire format (bad magic, header or array sizes)."""


# -- wire format -------------------------------------------------------------------------------------------------
def _wire_dtype(dtype: Any) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.kind not in "buif":
        raise WireError(f"dtype {dt} cannot be sent; use a numeric array")
    dt = dt.newbyteorder("<") if dt.byteorder not in ("|", "<") else dt
    if dt.str not in DTYPES:
        raise WireError(f"dtype {dt.str} is not one of {list(DTYPES)}")
    return dt


def encode(header: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> bytes:
    """Header (JSON-able) + named arrays -> one message (the arrays are listed in ``header["arrays"]``)."""
    parts, infos = [], []
    for name, array in (arrays or {}).items():
        array = np.asarray(array)
        dt = _wire_dtype(array.dtype)
        parts.append(np.ascontiguousarray(array, dtype=dt).tobytes())
        infos.append({"name": name, "dtype": dt.str, "shape": [int(s) for s in array.shape]})
    head = json.dumps({**header, "arrays": infos}).encode("utf-8")
    return b"".join([MAGIC, struct.pack("<I", len(head)), head, *parts])


def decode_header(body: bytes) -> tuple[dict[str, Any], int]:
    """The JSON header of a message and the offset where its arrays start."""
    if len(body) < 8 or body[:4] != MAGIC:
        raise WireError("not a dMoE message: it must start with b'DMOE' and a 4-byte header length")
    (n,) = struct.unpack("<I", body[4:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(body):
        raise WireError(f"header length {n} does not fit the message of {len(body)} bytes")
    try:
        header = json.loads(body[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WireError(f"header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise WireError("header must be a JSON object")
    return header, 8 + n


def decode_arrays(body: bytes, header: Mapping[str, Any], offset: int) -> dict[str, np.ndarray]:
    """The arrays a header lists, read from ``body`` after ``offset`` (sizes checked, no copy, no pickle)."""
    infos = header.get("arrays")
    if not isinstance(infos, list):
        raise WireError("header has no 'arrays' list")
    out: dict[str, np.ndarray] = {}
    view = memoryview(body)
    for info in infos:
        try:
            name, dt = str(info["name"]), _wire_dtype(info["dtype"])
            shape = tuple(int(s) for s in info["shape"])
        except (KeyError, TypeError, ValueError) as err:
            raise WireError(f"array entry {info!r} needs name, dtype and shape ({err})") from None
        if any(s < 0 for s in shape):
            raise WireError(f"array {name!r} has a negative size in shape {shape}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if offset + nbytes > len(body):
            raise WireError(f"array {name!r} {shape} {dt.str} needs {nbytes} bytes; the message is too short")
        out[name] = np.frombuffer(view[offset : offset + nbytes], dtype=dt).reshape(shape)
        offset += nbytes
    if offset != len(body):
        raise WireError(f"{len(body) - offset} bytes after the last array; the header does not describe them")
    return out


def decode(body: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    header, offset = decode_header(body)
    return header, decode_arrays(body, header, offset)


# -- geometry helpers (3D Slicer gives IJK-to-RAS matrices and (k, j, i) arrays) --------------------------------
def geometry_from_ijk_to_ras(ijk_to_ras: Any) -> tuple[list[float], list[float], list[list[float]]]:
    """Slicer's 4x4 IJK-to-RAS matrix -> (spacing, origin, direction) for a (k, j, i) = (z, y, x) array."""
    m = np.asarray(ijk_to_ras, dtype=float).reshape(4, 4)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ m
    columns = lps[:3, [2, 1, 0]]  # array axes z, y, x are index axes k, j, i
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing <= 0):
        raise ValueError("IJK-to-RAS matrix has a zero-length axis")
    direction = (columns / spacing).T[:, ::-1]  # row a: axis a in (S, P, L)
    return spacing.tolist(), lps[:3, 3][::-1].tolist(), direction.tolist()


def ijk_to_ras_from_geometry(spacing: Sequence[float], origin: Sequence[float],
                             direction: Sequence[Sequence[float]] | None = None) -> np.ndarray:
    """Inverse of ``geometry_from_ijk_to_ras`` (3D only)."""
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=float)
    columns = (d[:, ::-1] * np.asarray(spacing, float)[:, None]).T  # column a: axis a in LPS
    lps = np.eye(4)
    lps[:3, :3] = columns[:, [2, 1, 0]]
    lps[:3, 3] = np.asarray(origin, float)[::-1]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


# -- what napari's and Slicer's front ends show (here, so it is tested without Slicer) ---------------------------
UNKNOWN = "unknown"
# segment colours (matplotlib's tab10 without grey), RGB 0..1 as Slicer stores them; cycled for many classes. The
# .seg.nrrd writer and the Slicer module both use them, so a class looks the same in either
SEGMENT_COLORS = (
    (0.839, 0.153, 0.157), (0.122, 0.467, 0.706), (0.173, 0.627, 0.173), (1.0, 0.498, 0.055),
    (0.580, 0.404, 0.741), (0.549, 0.337, 0.294), (0.890, 0.467, 0.761), (0.737, 0.741, 0.133),
    (0.090, 0.745, 0.812),
)


def segment_table(class_names: Sequence[str]) -> list[tuple[int, str, tuple[float, float, float]]]:
    """(label value, segment name, colour) for each foreground class 1..n."""
    return [(k, str(name).strip() or f"label {k}", SEGMENT_COLORS[(k - 1) % len(SEGMENT_COLORS)])
            for k, name in enumerate(class_names) if k > 0]


def attribute_request(choices: Mapping[str, str]) -> dict[str, str] | None:
    """Drop-down choices -> the ``attribute`` of ``segment``: the known values, or None when all are unknown."""
    known = {name: value for name, value in choices.items() if value and value != UNKNOWN}
    return known or None


def describe_model(info: Mapping[str, Any]) -> str:
    """One line about a listed model: dimensions, classes, and what it was trained on when the file says."""
    parts = [f"{info.get('spatial_dims', '?')}D", "classes: " + ", ".join(info.get("class_names", [])[1:])]
    trained = info.get("trained_on") or {}
    if trained.get("modality"):
        parts.append(f"trained on {trained['modality']}")
    if trained.get("spacing"):
        parts.append("voxels " + " x ".join(f"{s:g}" for s in trained["spacing"]) + " mm")
    data = ((info.get("training") or {}).get("data") or {}).get("train") or {}
    if data.get("n"):
        parts.append(f"{data['n']} training cases")
    return "; ".join(parts)


# -- client ------------------------------------------------------------------------------------------------------
@dataclass
class RemoteSegmentation:
    """What the server sends back, on the grid that was sent. Field names follow the engine's ``Segmentation``
    (``routing`` holds only ``"mean"``, [experts, *grid] float16), so the napari result layers take either."""

    labels: np.ndarray
    routing: dict[str, np.ndarray]
    dominant_expert: np.ndarray | None
    attribute: Any
    device: str
    timings: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    conversions: list[str] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    model: str = ""
    spacing: list[float] | None = None
    origin: list[float] | None = None
    direction: list[list[float]] | None = None
    device_reason: str = ""


class Client:
    """``Client("http://gpu-box:8765", token)``: ``health()``, ``list_models()``, ``segment(...)``.

    Every failure raises ``ClientError`` (unreachable server, not a dMoE server) or ``ServerError`` (refused:
    wrong token, bad input, too large, busy) with the server's one-line message."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 600.0) -> None:
        url = url.strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            url = "http://" + url
        self.url, self.token, self.timeout = url, (token or "").strip() or None, timeout

    def _request(self, path: str, body: bytes | None = None) -> tuple[bytes, str]:
        headers = {"Accept": f"{CONTENT_TYPE}, application/json"}
        if body is not None:
            headers["Content-Type"] = CONTENT_TYPE
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=body, headers=headers,
                                     method="POST" if body is not None else "GET")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as reply:
                return reply.read(), reply.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            raise ServerError(err.code, _error_message(err.read(), err.reason)) from None
        except urllib.error.URLError as err:
            if isinstance(err.reason, (BrokenPipeError, ConnectionResetError)):
                raise ClientError(f"the dMoE server at {self.url} closed the connection while the request was being "
                                  "sent: most likely the volume is over its size limit (dmoe serve --max-request-mb)"
                                  ) from None
            raise ClientError(f"cannot reach the dMoE server at {self.url} ({err.reason}); is `dmoe serve` running "
                              "there, and is the address right?") from None
        except (TimeoutError, OSError) as err:
            raise ClientError(f"no answer from the dMoE server at {self.url} ({err})") from None

    def _json(self, path: str) -> Any:
        data, _ = self._request(path)
        try:
            return json.loads(data)
        except json.JSONDecodeError:
            raise ClientError(f"{self.url}{path} did not answer JSON: is this a dMoE server?") from None

    def health(self) -> dict[str, Any]:
        return self._json("/health")

    def list_models(self) -> list[dict[str, Any]]:
        """The server's models: id, class names, attributes (name, values), what each was trained on, ..."""
        return self._json("/models")["models"]

    def segment(self, model: str, volume: np.ndarray, *, spacing: Sequence[float] | None = None,
                origin: Sequence[float] | None = None, direction: Sequence[Sequence[float]] | None = None,
                attribute: str | Mapping[str, str] | None = None, routing: bool = False,
                rgb: bool | None = None, modality: str | None = None, force: bool = False) -> RemoteSegmentation:
        """Segment ``volume`` with the server's model ``model`` (an id from ``list_models``); see the module
        docstring for the geometry. ``attribute``: a value, a dict name -> value, or None (unknown: averaged).
        An image unlike the model's training data (``modality``, e.g. "CT", helps tell) is refused unless
        ``force``, as ``dmoe segment`` does."""
        header = {"model": model, "attribute": dict(attribute) if isinstance(attribute, Mapping) else attribute,
                  "spacing": None if spacing is None else [float(s) for s in spacing],
                  "origin": None if origin is None else [float(o) for o in origin],
                  "direction": None if direction is None else np.asarray(direction, float).tolist(),
                  "routing": bool(routing), "rgb": rgb, "modality": modality, "force": bool(force)}
        data, kind = self._request("/segment", encode(header, {"image": np.asarray(volume)}))
        try:
            head, arrays = decode(data)
        except WireError as err:
            raise ClientError(f"{self.url}/segment answered something else than a dMoE result ({err})") from None
        mean = arrays.get("routing_mean")
        return RemoteSegmentation(
            labels=arrays["labels"], routing={"mean": mean} if mean is not None else {},
            dominant_expert=arrays.get("dominant_expert"), attribute=head.get("attribute_used"),
            device=str(head.get("device", "")), timings=dict(head.get("timings") or {}),
            warnings=list(head.get("warnings") or []), conversions=list(head.get("conversions") or []),
            class_names=list(head.get("class_names") or []), model=str(head.get("model", model)),
            spacing=head.get("spacing"), origin=head.get("origin"), direction=head.get("direction"),
            device_reason=str(head.get("device_reason", "")))


def _error_message(body: bytes, reason: Any) -> str:
    try:
        data = json.loads(body)
        return str(data.get("error") or data.get("detail") or data)
    except (json.JSONDecodeError, AttributeError):
        return str(reason)
