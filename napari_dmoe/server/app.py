"""The HTTP application: /health, /models, /segment (and /openapi.json, the API description, for the token).

FastAPI (on Starlette, served by uvicorn) because it is maintained, validates the request header with pydantic,
and turns every refusal into one JSON shape through exception handlers. No /docs page: FastAPI's loads its
scripts from a CDN, blank on a hospital network; /openapi.json describes the API to those who hold the token.
The volume itself is not JSON: it travels as raw bytes after a JSON header (``napari_dmoe.client``), which keeps a
512x512x300 CT at its real size and never unpickles anything.

Every error is ``{"error": "<one line>", "status": <code>}``: 400 malformed message, 401 missing or wrong token,
404 unknown model or path, 408 body too slow, 411 no Content-Length, 413 request or volume too large, 422 a header
or image the model cannot take, 503 queue or upload budget full, 500 a bug (its traceback goes to the server log,
once, never to the client). A request is admitted from its Content-Length before its body is read; its message
header is checked (sizes, model, the grid after resampling) as soon as it has arrived, before the bulk.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import math
import struct
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from napari_dmoe import __version__
from napari_dmoe.client import CONTENT_TYPE, MAGIC, MAX_HEADER_BYTES, WireError, array_shape, decode_arrays, \
    decode_header, encode
from napari_dmoe.server.guard import ErrorMiddleware, read_body
from napari_dmoe.server.schemas import ErrorReply, HealthReply, ModelsReply, SegmentHeader
from napari_dmoe.server.work import Busy, DeviceQueue, UploadBudget

log = logging.getLogger("napari_dmoe.server")


@dataclass
class Limits:
    max_request_bytes: int = 1 << 30  # 1 GiB: a 512x512x1000 float32 CT fits
    max_voxels: int = 512 * 512 * 1024  # the grid sent, and the grid the model works on after resampling
    max_waiting: int = 32  # requests waiting for the device (uploading or queued) besides the running one
    max_inflight_bytes: int = 2 << 30  # request bodies being received or waiting, all requests together
    body_idle_s: float = 30.0  # longest silence while a body arrives


def create_app(store: Any, *, token: str | None = None, limits: Limits | None = None,
               device_reason: str = "") -> FastAPI:
    """An app serving the models of ``store`` (``server.models.ModelStore``); ``token``: required bearer token."""
    limits = limits or Limits()
    queue, budget = DeviceQueue(limits.max_waiting), UploadBudget(limits.max_inflight_bytes)
    app = FastAPI(title="napari-dmoe segmentation server", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url=None, description="dMoE fair segmentation. Binary message format: see "
                  "napari_dmoe/client.py.")
    _install_error_handlers(app)

    def authorised(request: Request) -> None:
        if token is None:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise HTTPException(401, "missing or wrong token: send the header 'Authorization: Bearer <token>' with "
                                "the token the server was started with", headers={"WWW-Authenticate": "Bearer"})

    errors = {code: {"model": ErrorReply} for code in (400, 401, 404, 408, 411, 413, 422, 503)}

    @app.get("/health", response_model=HealthReply, response_model_exclude_none=True)
    def health(request: Request) -> dict[str, Any]:
        """Liveness without a token ({"status": "ok"} only); with the token: version, device, models, queue."""
        if token is not None and "authorization" not in request.headers:
            return {"status": "ok"}
        authorised(request)  # a token that is sent must be right: clients check theirs here before uploading
        return {"status": "ok", "version": __version__, "device": str(store.device), "device_reason": device_reason,
                "models": store.ids(), "queued": queue.waiting}

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(authorised)])
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/models", response_model=ModelsReply, responses=errors, dependencies=[Depends(authorised)])
    def models() -> dict[str, Any]:
        return {"models": store.describe()}

    @app.post("/segment", dependencies=[Depends(authorised)], responses={
        200: {"content": {CONTENT_TYPE: {}}, "description": "labels (+ routing_mean, dominant_expert) on the sent grid"},
        **errors}, openapi_extra={"requestBody": {"required": True, "content": {CONTENT_TYPE: {
            "schema": {"type": "string", "format": "binary",
                       "description": "b'DMOE', uint32 header length, JSON header (SegmentHeader), raw arrays"}}}}})
    async def segment(request: Request) -> Response:
        length = _content_length(request, limits.max_request_bytes)
        try:
            ticket = queue.admit()
        except Busy as err:
            raise HTTPException(503, str(err), headers={"Retry-After": "5"}) from None
        try:
            with budget.reserve(length):
                header, model, image = await _receive(request, length, limits, store)
                cancel = threading.Event()
                watcher = asyncio.create_task(_watch_disconnect(request, cancel))
                try:
                    head, arrays = await queue.run(ticket, run_segment, model, image, header, str(store.device),
                                                   cancel=cancel)
                finally:
                    watcher.cancel()
        except Busy as err:
            raise HTTPException(503, str(err), headers={"Retry-After": "5"}) from None
        except ValueError as err:  # InferenceError & co: what the model cannot take, said for users
            raise HTTPException(422, " ".join(str(err).split())) from None
        finally:
            ticket.release()
        return Response(encode({**head, "model": header.model}, arrays), media_type=CONTENT_TYPE)

    app.add_middleware(ErrorMiddleware)
    return app


def run_segment(model: Any, image: np.ndarray, header: SegmentHeader, device: str) -> tuple[dict, dict]:
    """The engine facade on the canonical view of ``image``; results back on the sent grid (a worker thread)."""
    import dataclasses

    from napari_dmoe.inference.fit import FitError
    from napari_dmoe.inference.request import EngineSettings, SegmentRequest, iter_run
    from napari_dmoe.server.work import drain  # stops between window batches when the client has gone
    from napari_dmoe.server.geometry import reorientation

    n = len(header.direction) if header.direction else None
    reo = reorientation(header.direction, n) if n else None
    # the engine's defaults are dmoe segment's (overlap, window batch, AMP): the same file gives the same mask
    request = SegmentRequest.from_wire(header, image, EngineSettings(device=device))
    if reo:
        request = dataclasses.replace(request, image=reo.to_canonical(image), spacing=reo.spacing(header.spacing))
    try:
        result = drain(iter_run(model, request))
    except FitError as err:
        raise err.hint("send force=true to segment it anyway") from None
    back = reo.from_canonical if reo else (lambda a, leading=0: a)
    n_classes = len(model.spec.class_names)
    seg, prov = result.segmentation, result.provenance
    arrays = {"labels": back(seg.labels.astype(np.uint8 if n_classes <= 256 else np.uint16))}
    if header.routing and seg.routing:
        arrays["routing_mean"] = back(seg.routing["mean"], leading=1)
        arrays["dominant_expert"] = back(seg.dominant_expert)
    head = {"attribute_used": prov.attribute, "device": prov.device, "device_reason": seg.device_reason,
            "timings": seg.timings, "warnings": prov.fit_findings + prov.warnings, "conversions": prov.conversions,
            "forced": prov.forced, "fit_findings": prov.fit_findings,
            "class_names": list(model.spec.class_names), "spacing": header.spacing, "origin": header.origin,
            "direction": header.direction}
    return head, arrays


def _content_length(request: Request, limit: int) -> int:
    """The declared body size, refused before anything is read: missing (411), malformed (400), too large (413)."""
    text = request.headers.get("content-length")
    if text is None:
        raise HTTPException(411, "send the request with a Content-Length header (the body's size in bytes)")
    if not text.isdigit() or len(text) > 15:
        raise HTTPException(400, f"Content-Length {text[:20]!r} is not a size in bytes")
    length = int(text)
    if length > limit:
        raise HTTPException(413, f"request of {length} bytes is larger than this server's limit of {limit} bytes "
                            "(dmoe serve --max-request-mb); send a smaller volume or crop it")
    return length


async def _receive(request: Request, length: int, limits: Limits, store: Any) -> tuple[SegmentHeader, Any, Any]:
    """Read the body; its message header is checked as soon as it is in (sizes, model, work), then the image."""
    checked: dict[str, Any] = {}

    def on_prefix(view: memoryview, received: int) -> int:
        if received < min(8, length):
            return 1
        if received < 8 or bytes(view[:4]) != MAGIC:
            raise HTTPException(400, "not a dMoE message: it must start with b'DMOE' and a 4-byte header length")
        (n,) = struct.unpack("<I", view[4:8])
        if n <= MAX_HEADER_BYTES and received < min(8 + n, length):
            return 1
        try:
            raw, offset = decode_header(view[:received])
        except WireError as err:
            raise HTTPException(400, str(err)) from None
        checked.update(zip(("raw", "offset"), (raw, offset)))
        checked.update(zip(("header", "model"), _check_header(raw, offset, length, limits, store)))
        return 0

    view = await read_body(request.receive, length, idle_s=limits.body_idle_s, on_prefix=on_prefix)
    try:
        image = decode_arrays(view, checked["raw"], checked["offset"])["image"]
    except WireError as err:
        raise HTTPException(400, str(err)) from None
    return checked["header"], checked["model"], image


def _check_header(raw: dict, offset: int, length: int, limits: Limits, store: Any) -> tuple[SegmentHeader, Any]:
    """The validated header and its model; 413 when the image, or the grid the model works on, is too large."""
    try:
        sizes = [array_shape(info)[3] for info in raw.get("arrays") or [] if isinstance(info, dict)]
    except WireError as err:
        raise HTTPException(400, str(err)) from None
    if offset + sum(sizes) != length:
        raise HTTPException(400, f"the header lists {sum(sizes)} bytes of arrays but the body carries "
                            f"{length - offset}")
    try:
        header = SegmentHeader.model_validate(raw)
    except ValidationError as err:
        raise HTTPException(422, _validation_message(err)) from None
    shape = header.arrays[0].shape
    values = math.prod(shape)
    if values > limits.max_voxels:
        raise HTTPException(413, f"image {shape} has {values} values; this server takes at most "
                            f"{limits.max_voxels} (dmoe serve --max-voxels)")
    try:
        model = store.get(header.model)
    except LookupError as err:
        raise HTTPException(404, str(err)) from None
    grid = work_grid(model.spec, header)
    if math.prod(grid) > limits.max_voxels:
        raise HTTPException(413, f"image {shape} with voxels of {header.spacing} mm is resampled to "
                            f"{model.spec.spacing} mm for this model: a grid of {grid} = {math.prod(grid)} voxels, "
                            f"more than this server's {limits.max_voxels} (dmoe serve --max-voxels); check the "
                            "voxel size")
    return header, model


def work_grid(spec: Any, header: SegmentHeader) -> tuple[int, ...]:
    """The spatial grid the engine works on: the sent one, resampled to the model's voxel size when both voxel
    sizes are known (``limits.resampled_grid``, the engine's rule), axes in the engine's canonical order."""
    from napari_dmoe.limits import resampled_grid
    from napari_dmoe.server.geometry import reorientation

    shape = tuple(header.arrays[0].shape)
    rgb = header.rgb if header.rgb is not None else (len(shape) in (3, 4) and shape[-1] in (3, 4))
    spatial = shape[:-1] if rgb else shape
    if header.spacing is None or spec.spacing is None or len(header.spacing) != len(spatial):
        return spatial
    n, dims = len(spatial), int(spec.spatial_dims)
    reo = reorientation(header.direction, n) if header.direction else None
    canonical = reo.shape(spatial) if reo else spatial
    spacing = reo.spacing(header.spacing) if reo else list(header.spacing)
    if dims > n or len(spec.spacing) != dims:
        return spatial
    # a 2D model on a volume resamples each slice; the slice axis is not resampled
    return (*canonical[: n - dims], *resampled_grid(canonical[n - dims:], spacing[n - dims:], spec.spacing))


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
    """Set ``cancel`` when the client closes its connection (the body is read: the next message is that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            return


def _validation_message(err: ValidationError | RequestValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body",))
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "invalid request header: " + "; ".join(parts)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_message(exc))

    # no handler for Exception: Starlette's would log the traceback and re-raise it to uvicorn, which logs it
    # again; guard.ErrorMiddleware answers the 500 and logs it once
