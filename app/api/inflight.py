"""Requests in flight, so that shutdown keeps its promise: MODEL_RUNNER_SHUTDOWN_TIMEOUT for
them to finish, then they are ended, at once.

aiohttp's own graceful shutdown waits its timeout for handlers, then waits it again for the
ones it cancelled, and cancels a handler by its request body, which a streaming answer no longer
reads: a SIGTERM took twice the timeout plus the runners' time, past Docker's 10 s. Here the
service cancels what is left itself, and a stream that is cut says so before it ends.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from app.api.middleware import Handler
from app.logging import get_logger

log = get_logger("shutdown")
# How long cancelled requests get to write their last words and let go of their runners.
CANCEL_GRACE_S = 1.0


class InFlight:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[object]] = set()
        self.cutting = False  # set when shutdown cuts what is left

    @web.middleware
    async def track(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            return await handler(request)
        finally:
            self._tasks.discard(task)

    async def drain(self, timeout: float) -> None:
        """Let requests in flight finish for ``timeout`` seconds, then cancel the rest."""
        pending = set(self._tasks)
        if pending:
            log.info("waiting for requests in flight", requests=len(pending), timeout_s=timeout)
            _, pending = await asyncio.wait(pending, timeout=timeout)
        if not pending:
            return
        log.warning("cutting requests still in flight", requests=len(pending))
        self.cutting = True
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=CANCEL_GRACE_S)


IN_FLIGHT = web.AppKey("in_flight", InFlight)


def cut_by_shutdown(request: web.Request) -> bool:
    """Whether this request's cancellation is the service shutting down (not its client
    leaving): then a stream can still tell its client why it ends."""
    return request.app[IN_FLIGHT].cutting
