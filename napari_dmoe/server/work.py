"""One queue per device: requests wait their turn (in the event loop, not in threads) and run one at a time on
the device, so concurrent requests are answered in order instead of fighting over GPU memory or being dropped.
A bounded number may wait; beyond it the server says 503 busy rather than piling up request bodies in memory."""
from __future__ import annotations

import asyncio
from typing import Any, Callable

from starlette.concurrency import run_in_threadpool


class Busy(RuntimeError):
    """More requests are waiting than the queue holds."""


class DeviceQueue:
    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self.waiting = 0
        self._lock: asyncio.Lock | None = None  # made in the server's event loop on first use

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` in a worker thread once the device is free."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        if self.waiting >= self.max_waiting:
            raise Busy(f"{self.waiting} requests are already queued (the limit is {self.max_waiting}); "
                       "retry in a moment")
        self.waiting += 1
        try:
            async with self._lock:
                return await run_in_threadpool(fn, *args)
        finally:
            self.waiting -= 1
