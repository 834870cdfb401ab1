"""One queue per device: requests wait their turn (in the event loop, not in threads) and run one at a time on
the device, so concurrent requests are answered in order instead of fighting over GPU memory or being dropped.

Admission happens before a request's body is read: a request takes a place in the queue (``admit``) and a share of
the upload budget (``UploadBudget``) from its Content-Length, so a full queue or a flood of large uploads is
answered 503 without reading the bodies into memory. A request whose client has gone is dropped: before it starts,
and between window batches while it runs (``drain`` closes the engine's generator).
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable, Generator

from starlette.concurrency import run_in_threadpool

POLL_S = 0.25  # how often a waiting request looks whether its client is still there


class Busy(RuntimeError):
    """More requests are waiting, or more bytes are being uploaded, than the server holds."""


class Gone(RuntimeError):
    """The client closed its connection; its request was dropped."""


_job = threading.local()  # the cancel event of the request the current worker thread runs


def cancel_requested() -> bool:
    """True in a worker thread whose request's client has gone."""
    event = getattr(_job, "cancel", None)
    return event is not None and event.is_set()


def drain(generator: Generator[Any, None, Any]) -> Any:
    """Run an engine generator (``iter_run``, ``iter_segment``) to its result; when the client has gone, close it
    between window batches (the engine stops there) and raise ``Gone``."""
    try:
        while True:
            next(generator)
            if cancel_requested():
                generator.close()
                raise Gone("the client went away; its segmentation was stopped")
    except StopIteration as stop:
        return stop.value


class Ticket:
    """A place in the queue, taken before the body is read; released once (run or refused)."""

    def __init__(self, queue: "DeviceQueue") -> None:
        self._queue, self.held = queue, True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._queue.waiting -= 1


class DeviceQueue:
    """``max_waiting`` requests may wait (uploading or queued) besides the one running on the device."""

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self.waiting = 0
        self._lock: asyncio.Lock | None = None  # made in the server's event loop on first use

    def admit(self) -> Ticket:
        if self.waiting >= self.max_waiting:
            raise Busy(f"{self.waiting} requests are already waiting for the device (dmoe serve --max-queue "
                       f"{self.max_waiting}); retry in a moment")
        self.waiting += 1
        return Ticket(self)

    async def run(self, ticket: Ticket, fn: Callable[..., Any], *args: Any,
                  cancel: threading.Event | None = None) -> Any:
        """Run ``fn(*args)`` in a worker thread once the device is free; ``Gone`` when ``cancel`` is set first."""
        cancel = cancel or threading.Event()
        if self._lock is None:
            self._lock = asyncio.Lock()
        try:
            while True:
                if cancel.is_set():
                    raise Gone("the client went away while its request waited; dropped")
                try:
                    await asyncio.wait_for(self._lock.acquire(), POLL_S)
                    break
                except asyncio.TimeoutError:
                    continue
        finally:
            ticket.release()
        try:
            if cancel.is_set():
                raise Gone("the client went away while its request waited; dropped")
            return await run_in_threadpool(_call, cancel, fn, *args)
        finally:
            self._lock.release()


def _call(cancel: threading.Event, fn: Callable[..., Any], *args: Any) -> Any:
    _job.cancel = cancel
    try:
        return fn(*args)
    finally:
        _job.cancel = None


class UploadBudget:
    """Bytes of request bodies being received or waiting, across requests: a new upload that would pass
    ``max_bytes`` is refused (503) before its body is read."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.used = max_bytes, 0

    def reserve(self, n: int) -> "Reservation":
        if self.used + n > self.max_bytes:
            raise Busy(f"the server is receiving {self.used} bytes of other requests and holds at most "
                       f"{self.max_bytes} (dmoe serve --max-inflight-mb); retry in a moment")
        self.used += n
        return Reservation(self, n)


class Reservation:
    def __init__(self, budget: UploadBudget, n: int) -> None:
        self._budget, self._n = budget, n

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._budget.used -= self._n
        self._n = 0
