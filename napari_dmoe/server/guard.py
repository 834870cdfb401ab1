"""What keeps one client from holding the server: time limits on a request's header and body, the body read into
one buffer of its declared size, and one log line (not a traceback from each layer) for a failure.

- ``TimedH11Protocol``: uvicorn's HTTP/1.1 protocol with a header time limit. uvicorn closes idle keep-alive
  connections but waits forever for a request whose header never ends (``POST /segm`` and nothing more).
- ``read_body``: the body of a request already admitted by its Content-Length, with a per-chunk idle limit and a
  total limit in proportion to its size; a client that goes away is ``Gone``, a slow one 408.
- ``ErrorMiddleware``: turns an unexpected exception into the JSON 500 and logs it once (Starlette's own handler
  logs it and re-raises, so uvicorn logged it a second time).
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Awaitable, Callable

import numpy as np
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from napari_dmoe.server.work import Gone

log = logging.getLogger("napari_dmoe.server")

HEADER_TIMEOUT_S = 20.0  # from connection (or the previous answer) to the end of a request's header
DRAIN_BYTES = 64 << 20  # the unread rest of a refused request's body is received and dropped up to this much before
# the answer, so a client that sends its whole body before reading (urllib, requests) gets the answer, not a reset
# (uvicorn closes a connection answered before its body ended)
DRAIN_IDLE_S = 10.0
BODY_IDLE_S = 30.0  # longest silence while a body arrives
MIN_RATE = 1 << 20  # bytes per second a body may not fall below on average (after a 60 s allowance)


class TimedH11Protocol(H11Protocol):
    """Closes a connection whose request header has not arrived ``header_timeout`` seconds after the connection
    opened or the previous response ended."""

    header_timeout = HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:  # a request's header arrived and its cycle began
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_too_slow)

    def _cancel_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _header_too_slow(self) -> None:
        self._header_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being answered: its body has its own limits
        if not self.transport.is_closing():
            log.info("closed a connection from %s: no complete request header within %.0f s",
                     _peer(self.client), self.header_timeout)
            self.transport.close()


def _peer(client: Any) -> str:
    return f"{client[0]}:{client[1]}" if client else "?"


async def read_body(receive: Callable[[], Awaitable[dict]], length: int, *, idle_s: float = BODY_IDLE_S,
                    on_prefix: Callable[[memoryview, int], int] | None = None) -> memoryview:
    """The ``length`` bytes of a body, in one buffer allocated up front (pages are committed as data arrive, so
    memory follows what was sent). ``on_prefix(buffer, received)`` is called as data arrive until it returns 0
    (e.g. once the message header can be checked), so a refusal comes before the bulk of the upload."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60.0 + length / MIN_RATE
    buffer = np.empty(length, np.uint8)
    view, received = memoryview(buffer), 0
    while True:
        wait = min(idle_s, deadline - loop.time())
        try:
            if wait <= 0:
                raise asyncio.TimeoutError
            message = await asyncio.wait_for(receive(), wait)
        except asyncio.TimeoutError:
            raise HTTPException(408, f"the request body arrived too slowly ({received} of {length} bytes); "
                                "check the network and send it again") from None
        if message["type"] == "http.disconnect":
            raise Gone(f"the client went away after sending {received} of {length} bytes")
        chunk = message.get("body", b"")
        if received + len(chunk) > length:
            raise HTTPException(400, f"the body is longer than its Content-Length of {length} bytes")
        view[received : received + len(chunk)] = chunk
        received += len(chunk)
        if on_prefix is not None and on_prefix(view, received) == 0:
            on_prefix = None
        if not message.get("more_body", False):
            break
    if received != length:
        raise HTTPException(400, f"the body has {received} bytes but its Content-Length says {length}")
    return view


async def _drain(receive: Callable[[], Awaitable[dict]], body: dict) -> None:
    """Receive and drop what is left of a request's body (it was refused before being read)."""
    while not body["done"]:
        try:
            await asyncio.wait_for(receive(), DRAIN_IDLE_S)
        except asyncio.TimeoutError:
            return


class ErrorMiddleware:
    """The JSON 500 for a bug, logged once with its traceback; a client gone mid-request logged in one line; the
    unread rest of a refused body (up to ``DRAIN_BYTES``) received and dropped before the answer."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        length = dict(scope.get("headers") or []).get(b"content-length", b"0")
        body = {"left": int(length) if length.isdigit() else 0}
        body["done"] = body["left"] == 0

        async def received() -> dict:
            message = await receive()
            body["left"] -= len(message.get("body", b""))
            body["done"] = message["type"] == "http.disconnect" or not message.get("more_body", False)
            return message

        async def tracked(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not body["done"] and body["left"] <= DRAIN_BYTES and message["status"] != 408:  # 408: it stalled
                    await _drain(received, body)
            await send(message)

        try:
            await self.app(scope, received, tracked)
        except Gone as err:
            log.info("%s %s from %s: %s", scope.get("method"), scope.get("path"), _peer(scope.get("client")), err)
        except Exception as exc:  # noqa: BLE001 - the one place a bug becomes a 500
            log.error("unexpected error on %s", scope.get("path"), exc_info=exc)  # the traceback stays in the log
            if not started:
                body = json.dumps({"error": f"internal error ({type(exc).__name__}); the server log has the "
                                   "details", "status": 500}).encode()
                await send({"type": "http.response.start", "status": 500,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
