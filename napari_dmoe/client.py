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

import http.client
import json
import math
import socket
import struct
import threading
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

MAGIC = b"DMOE"
CONTENT_TYPE = "application/x-dmoe"
DTYPES = ("|b1", "|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f2", "<f4", "<f8")  # little-endian
MAX_HEADER_BYTES = 1 << 20
MAX_DEPTH = 16  # JSON nesting a header may have (ours needs 4); deeper is refused before json.loads recurses
MAX_DIMS = 8  # axes an array may have
AUTH_FIRST_BYTES = 1 << 20  # a larger request is preceded by one small authenticated call (once per Client)


class ClientError(ValueError):
    """The server could not be reached or answered something that is not a dMoE reply."""


class ServerError(ClientError):
    """The server refused or failed the request; ``status`` is the HTTP status, the message the server's."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"server answered {status}: {message}")
        self.status, self.server_message = status, message


class WireError(ValueError):
    """A message is not in the dMoE wire format (bad magic, header or array sizes)."""


class Cancelled(ClientError):
    """``Client.abort()`` closed the connection of a request in progress."""


# -- wire format -------------------------------------------------------------------------------------------------
def _wire_dtype(dtype: Any, declared: bool = False) -> np.dtype:
    """The wire dtype of an array to send (any byte order: converted), or of a ``declared`` one in a message,
    which must already be little-endian: reading '>f4' bytes as '<f4' would give garbage, so it is refused."""
    if declared and (not isinstance(dtype, str) or dtype not in DTYPES):
        raise WireError(f"dtype {dtype!r} is not one of {list(DTYPES)}: the wire format carries little-endian "
                        "numbers only ('<f4', not '>f4'); swap the bytes before sending")
    try:
        dt = np.dtype(dtype)
    except TypeError as err:
        raise WireError(f"dtype {dtype!r} is not a numpy dtype ({err})") from None
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
    deep = WireError(f"header nests deeper than {MAX_DEPTH} levels; a dMoE header is a flat object")
    try:
        header = json.loads(bytes(body[8 : 8 + n]).decode("utf-8"))  # the C parser stops deep nesting itself
    except RecursionError:
        raise deep from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WireError(f"header is not valid JSON ({err})") from None
    if _depth(header) > MAX_DEPTH:
        raise deep
    if not isinstance(header, dict):
        raise WireError("header must be a JSON object")
    return header, 8 + n


def _depth(value: Any) -> int:
    """Deepest nesting of lists and objects in parsed JSON (the object itself is 1), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def array_shape(info: Any) -> tuple[str, np.dtype, tuple[int, ...], int]:
    """Name, dtype, shape and byte size of one ``arrays`` entry, checked; sizes are Python integers, so a shape
    like [2**32, 2**32, 1] is a large number to refuse, never an int64 overflow."""
    try:
        name, raw_shape = str(info["name"]), info["shape"]
        dt = _wire_dtype(info["dtype"], declared=True)
    except (KeyError, TypeError) as err:
        raise WireError(f"array entry {info!r} needs name, dtype and shape ({err})") from None
    if not isinstance(raw_shape, list) or len(raw_shape) > MAX_DIMS or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**62 for s in raw_shape):
        raise WireError(f"array {name!r}: shape {raw_shape!r} must be a list of at most {MAX_DIMS} non-negative "
                        "integers")
    shape = tuple(raw_shape)
    return name, dt, shape, math.prod(shape) * dt.itemsize


def decode_arrays(body: bytes, header: Mapping[str, Any], offset: int) -> dict[str, np.ndarray]:
    """The arrays a header lists, read from ``body`` after ``offset`` (sizes checked, no copy, no pickle)."""
    infos = header.get("arrays")
    if not isinstance(infos, list):
        raise WireError("header has no 'arrays' list")
    out: dict[str, np.ndarray] = {}
    view = memoryview(body)
    for info in infos:
        name, dt, shape, nbytes = array_shape(info)
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
# segment names and colours: napari_dmoe/colors.py (a leaf the Slicer module loads by path too)


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
    forced: bool = False  # the image did not fit the model and was segmented because the request said force
    fit_findings: list[str] = field(default_factory=list)


class Client:
    """``Client("http://gpu-box:8765", token)``: ``health()``, ``list_models()``, ``segment(...)``.

    Every failure raises ``ClientError`` (unreachable server, not a dMoE server) or ``ServerError`` (refused:
    wrong token, bad input, too large, busy) with the server's one-line message."""

    def __init__(self, url: str, token: str | None = None, timeout: float | None = None) -> None:
        url = url.strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            url = "http://" + url
        self._parts = parts = urllib.parse.urlsplit(url)
        try:
            if not parts.hostname or parts.port == 0:  # .port raises on a port that is not a number
                raise ValueError("no host name or port")
        except ValueError as err:
            raise ClientError(f"server address {url!r} is not valid ({err})") from None
        self.url, self.token, self.timeout = url, (token or "").strip() or None, timeout
        self._open: set[http.client.HTTPConnection] = set()
        self._lock = threading.Lock()
        self._aborted = self._access_checked = False
        self.stage = ""  # of the latest upload (POST): "sending" its body, then "waiting" for (or holding) the answer

    def timeout_for(self, values: int = 0) -> float:
        """Seconds to wait for an answer: ``timeout`` when given, else 30 s for a listing, and 60 s + 4 s per
        million values for a volume to segment (a CPU server's pace; a GPU answers sooner)."""
        if self.timeout is not None:
            return float(self.timeout)
        return 30.0 if not values else 60.0 + 4.0 * values / 1e6

    def abort(self) -> None:
        """Close the connections of requests in progress (from another thread): they raise ``Cancelled``, and the
        server, seeing its client gone, drops the work. An aborted client refuses further requests: make a new one."""
        with self._lock:
            self._aborted = True
            for conn in list(self._open):
                if conn.sock is not None:
                    try:
                        conn.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    def _request(self, path: str, body: bytes | None = None, timeout: float | None = None,
                 always_auth: bool = False) -> tuple[bytes, str]:
        headers = {"Accept": f"{CONTENT_TYPE}, application/json"}
        if body is not None:
            headers["Content-Type"] = CONTENT_TYPE
        if self.token or always_auth:  # always_auth: an empty token asks a token server for its 401 now
            headers["Authorization"] = f"Bearer {self.token or ''}"
        kind = http.client.HTTPSConnection if self._parts.scheme == "https" else http.client.HTTPConnection
        conn = kind(self._parts.hostname, self._parts.port, timeout=timeout or self.timeout_for())
        with self._lock:
            if self._aborted:
                raise Cancelled("cancelled: the request to the dMoE server was stopped")
            self._open.add(conn)
        try:
            status, reason, data, ctype = self._exchange(conn, self._parts.path + path, body, headers)
        except (OSError, http.client.HTTPException) as err:
            if self._aborted:
                raise Cancelled("cancelled: the request to the dMoE server was stopped") from None
            raise self._connection_error(err, body is not None) from None
        finally:
            with self._lock:
                self._open.discard(conn)
            conn.close()
        if status >= 400:
            raise ServerError(status, _error_message(data, reason))
        return data, ctype

    def _exchange(self, conn: http.client.HTTPConnection, path: str, body: bytes | None,
                  headers: dict[str, str]) -> tuple[int, str, bytes, str]:
        self.stage = "sending" if body is not None else self.stage  # a GET (the token check) is no upload
        try:
            conn.request("POST" if body is not None else "GET", path or "/", body=body, headers=headers)
        except (BrokenPipeError, ConnectionResetError):
            if conn.sock is None:
                raise
            # the server answered (401, 413, 503) before reading the whole body: read that answer if it is there
        self.stage = "waiting" if body is not None else self.stage
        reply = conn.getresponse()
        return reply.status, reply.reason, reply.read(), reply.headers.get("Content-Type", "")

    def _connection_error(self, err: Exception, sending: bool) -> ClientError:
        if isinstance(err, TimeoutError) or "timed out" in str(err):
            return ClientError(f"no answer from the dMoE server at {self.url} in time ({err}); it may be busy with "
                               "a large volume: pass a longer timeout, e.g. Client(url, token, timeout=1800)")
        if sending and isinstance(err, (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected)):
            return ClientError(f"the dMoE server at {self.url} closed the connection while the request was being "
                               "sent: the volume is most likely over its size limit (dmoe serve --max-request-mb) "
                               "or the server was too busy to take it")
        return ClientError(f"cannot reach the dMoE server at {self.url} ({err}); is `dmoe serve` running there, "
                           "and is the address right?")

    def _json(self, path: str, always_auth: bool = False) -> dict[str, Any]:
        data, _ = self._request(path, always_auth=always_auth)
        try:
            reply = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            reply = None
        if not isinstance(reply, dict):
            raise ClientError(f"{self.url}{path} did not answer a JSON object: is this a dMoE server?")
        return reply

    def health(self) -> dict[str, Any]:
        """The server's status, version, device and models. Sends the token (an empty one if none was given), so
        a server that requires one answers 401 here rather than after a large upload."""
        reply = self._json("/health", always_auth=True)
        self._access_checked = True
        return reply

    def list_models(self) -> list[dict[str, Any]]:
        """The server's models: id, class names, attributes (name, values), what each was trained on, ..."""
        models = self._json("/models").get("models")
        if not isinstance(models, list) or not all(isinstance(m, dict) and "id" in m for m in models):
            raise ClientError(f"{self.url}/models did not list models: is this a dMoE server?")
        self._access_checked = True
        return models

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
        return self.send(header, {"image": np.asarray(volume)})

    def send(self, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> RemoteSegmentation:
        """POST a ready /segment message: ``header`` and ``arrays`` as ``SegmentRequest.to_wire`` makes them
        (how the napari widget's remote mode sends the engine request it would run locally)."""
        model = str(header.get("model", ""))
        body = encode(dict(header), dict(arrays))
        if len(body) > AUTH_FIRST_BYTES and not self._access_checked:
            self.health()  # a wrong token is told in one round trip, not after uploading the volume
        values = sum(int(np.asarray(a).size) for a in arrays.values())
        data, kind = self._request("/segment", body, timeout=self.timeout_for(values))
        try:
            head, arrays = decode(data)
        except WireError as err:
            raise ClientError(f"{self.url}/segment answered something else than a dMoE result ({err})") from None
        if "labels" not in arrays:
            raise ClientError(f"{self.url}/segment answered a message without labels: is this a dMoE server?")
        mean = arrays.get("routing_mean")
        return RemoteSegmentation(
            labels=arrays["labels"], routing={"mean": mean} if mean is not None else {},
            dominant_expert=arrays.get("dominant_expert"), attribute=head.get("attribute_used"),
            device=str(head.get("device", "")), timings=dict(head.get("timings") or {}),
            warnings=list(head.get("warnings") or []), conversions=list(head.get("conversions") or []),
            class_names=list(head.get("class_names") or []), model=str(head.get("model", model)),
            spacing=head.get("spacing"), origin=head.get("origin"), direction=head.get("direction"),
            device_reason=str(head.get("device_reason", "")), forced=bool(head.get("forced", False)),
            fit_findings=list(head.get("fit_findings") or []))


def _error_message(body: bytes, reason: Any) -> str:
    try:
        data = json.loads(body)
        return " ".join(str(data.get("error") or data.get("detail") or data).split())[:500]
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, AttributeError):
        return str(reason)
