"""The HTTP application: /health, /models, /segment.

FastAPI (on Starlette, served by uvicorn) because it is maintained, validates the request header with pydantic,
turns every refusal into one JSON shape through exception handlers, and publishes the API at /docs (OpenAPI)
for people writing their own clients. The volume itself is not JSON: it travels as raw bytes after a JSON header
(``napari_dmoe.client``), which keeps a 512x512x300 CT at its real size and never unpickles anything.

Every error is ``{"error": "<one line>", "status": <code>}``: 400 malformed message, 401 missing or wrong token,
404 unknown model or path, 413 request or volume too large, 422 a header or image the model cannot take, 503 queue
full, 500 a bug (its traceback goes to the server log, never to the client).
"""
from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from napari_dmoe import __version__
from napari_dmoe.client import CONTENT_TYPE, WireError, decode_arrays, decode_header, encode
from napari_dmoe.server.schemas import ErrorReply, HealthReply, ModelsReply, SegmentHeader
from napari_dmoe.server.work import Busy, DeviceQueue

log = logging.getLogger("napari_dmoe.server")


DRAIN_BYTES = 256 << 20  # read past the limit at most this much before answering 413


@dataclass
class Limits:
    max_request_bytes: int = 1 << 30  # 1 GiB: a 512x512x1000 float32 CT fits
    max_voxels: int = 512 * 512 * 1024
    max_waiting: int = 32  # requests queued per device before 503


def create_app(store: Any, *, token: str | None = None, limits: Limits | None = None,
               device_reason: str = "") -> FastAPI:
    """An app serving the models of ``store`` (``server.models.ModelStore``); ``token``: required bearer token."""
    limits = limits or Limits()
    queue = DeviceQueue(limits.max_waiting)
    app = FastAPI(title="napari-dmoe segmentation server", version=__version__,
                  description="dMoE fair segmentation. Binary message format: see napari_dmoe/client.py.")
    _install_error_handlers(app)

    def authorised(request: Request) -> None:
        if token is None:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise HTTPException(401, "missing or wrong token: send the header 'Authorization: Bearer <token>' with "
                                "the token the server was started with", headers={"WWW-Authenticate": "Bearer"})

    errors = {code: {"model": ErrorReply} for code in (400, 401, 404, 413, 422, 503)}

    @app.get("/health", response_model=HealthReply)
    def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "device": str(store.device), "device_reason": device_reason,
                "models": store.ids(), "queued": queue.waiting}

    @app.get("/models", response_model=ModelsReply, responses=errors, dependencies=[Depends(authorised)])
    def models() -> dict[str, Any]:
        return {"models": store.describe()}

    @app.post("/segment", dependencies=[Depends(authorised)], responses={
        200: {"content": {CONTENT_TYPE: {}}, "description": "labels (+ routing_mean, dominant_expert) on the sent grid"},
        **errors}, openapi_extra={"requestBody": {"required": True, "content": {CONTENT_TYPE: {
            "schema": {"type": "string", "format": "binary",
                       "description": "b'DMOE', uint32 header length, JSON header (SegmentHeader), raw arrays"}}}}})
    async def segment(request: Request) -> Response:
        body = await _read_body(request, limits.max_request_bytes)
        try:
            raw, offset = decode_header(body)
            header = SegmentHeader.model_validate(raw)
        except WireError as err:
            raise HTTPException(400, str(err)) from None
        except ValidationError as err:
            raise HTTPException(422, _validation_message(err)) from None
        voxels = int(np.prod(header.arrays[0].shape, dtype=np.int64))
        if voxels > limits.max_voxels:
            raise HTTPException(413, f"image {header.arrays[0].shape} has {voxels} values; this server takes at most "
                                f"{limits.max_voxels} (dmoe serve --max-voxels)")
        try:
            image = decode_arrays(body, raw, offset)["image"]
        except WireError as err:
            raise HTTPException(400, str(err)) from None
        try:
            model = store.get(header.model)
        except LookupError as err:
            raise HTTPException(404, str(err)) from None
        try:
            head, arrays = await queue.run(run_segment, model, image, header, str(store.device))
        except Busy as err:
            raise HTTPException(503, str(err), headers={"Retry-After": "5"}) from None
        except ValueError as err:  # InferenceError & co: what the model cannot take, said for users
            raise HTTPException(422, " ".join(str(err).split())) from None
        return Response(encode({**head, "model": header.model}, arrays), media_type=CONTENT_TYPE)

    return app


def run_segment(model: Any, image: np.ndarray, header: SegmentHeader, device: str) -> tuple[dict, dict]:
    """The engine on the canonical view of ``image``; results back on the sent grid (runs in a worker thread)."""
    from napari_dmoe.inference.engine import segment
    from napari_dmoe.inference.fit import FitError, check_fit, describe
    from napari_dmoe.server.geometry import reorientation

    n = len(header.direction) if header.direction else None
    reo = reorientation(header.direction, n) if n else None
    canonical = reo.to_canonical(image) if reo else image
    spacing = reo.spacing(header.spacing) if reo else header.spacing
    # the fit check of dmoe segment: refuse an image unlike the model's training data unless forced
    findings = check_fit(model.spec, canonical, spacing, rgb=header.rgb, modality=header.modality)
    if findings and not header.force:
        raise FitError(f"the image does not fit the model {header.model!r} ({describe(findings)}); check the model "
                       "and the image, or send force=true to segment it anyway")
    # engine defaults are dmoe segment's defaults (overlap, window batch, AMP): the same file gives the same mask
    result = segment(model, canonical, header.attribute, spacing=spacing, device=device, rgb=header.rgb,
                     routing="mean" if header.routing else False)
    back = reo.from_canonical if reo else (lambda a, leading=0: a)
    n_classes = len(model.spec.class_names)
    arrays = {"labels": back(result.labels.astype(np.uint8 if n_classes <= 256 else np.uint16))}
    if header.routing and result.routing:
        arrays["routing_mean"] = back(result.routing["mean"], leading=1)
        arrays["dominant_expert"] = back(result.dominant_expert)
    head = {"attribute_used": result.attribute, "device": result.device, "device_reason": result.device_reason,
            "timings": result.timings, "warnings": [f.message for f in findings] + result.warnings, "conversions": result.conversions,
            "class_names": list(model.spec.class_names), "spacing": header.spacing, "origin": header.origin,
            "direction": header.direction}
    return head, arrays


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit``."""
    too_big = HTTPException(413, f"request larger than this server's limit of {limit} bytes "
                            "(dmoe serve --max-request-mb); send a smaller volume or crop it")
    length = request.headers.get("content-length")
    declared_too_big = length is not None and length.isdigit() and int(length) > limit
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if declared_too_big or total > limit:
            # read on (and drop) up to DRAIN_BYTES: a client that sends its whole body before it reads the answer
            # (urllib, Slicer's requests) then gets the 413 instead of a broken pipe
            if total > limit + DRAIN_BYTES:
                break
            continue
        chunks.append(chunk)
    if declared_too_big or total > limit:
        raise too_big
    return b"".join(chunks)


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

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s", request.url.path, exc_info=exc)  # the traceback stays in the log
        return _error(500, f"internal error ({type(exc).__name__}); the server log has the details")
