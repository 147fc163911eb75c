"""DMR's progress messages (spec 3.1): one JSON object per line, throttled per layer."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

# A layer reports when this much time has passed or this many bytes were added (DMR's values).
UPDATE_INTERVAL_S = 0.1
MIN_BYTES_FOR_UPDATE = 1024 * 1024
_VERB = {"pull": "Downloaded", "push": "Uploaded"}

Message = dict[str, Any]


def message(type_: str, text: str, mode: str = "pull") -> Message:
    """A line without byte counts: success, warning, error, or plain information."""
    return {
        "type": type_,
        "message": text,
        "total": 0,
        "layer": {"size": 0, "current": 0},
        "mode": mode,
    }


def layer_progress(mode: str, total: int, digest: str, size: int, current: int) -> Message:
    return {
        "type": "progress",
        "message": f"{_VERB[mode]}: {current / 1024 / 1024:.2f} MB",
        "total": total,
        "layer": {"id": digest, "size": size, "current": current},
        "mode": mode,
    }


def html_escape(text: str) -> str:
    """Go's html.EscapeString, which DMR applies to every line in text/plain mode."""
    return (
        text.replace("&", "&amp;")
        .replace("'", "&#39;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&#34;")
    )


class LayerReporter:
    """Turns byte counts for one layer into throttled progress messages."""

    def __init__(
        self, emit: Callable[[Message], None], mode: str, total: int, digest: str, size: int
    ) -> None:
        self._emit = emit
        self._mode, self._total, self._digest, self._size = mode, total, digest, size
        self._last_time = 0.0
        self._last_bytes = -1

    def __call__(self, current: int) -> None:
        now = time.monotonic()
        due = (
            now - self._last_time >= UPDATE_INTERVAL_S
            or current - self._last_bytes >= MIN_BYTES_FOR_UPDATE
            or (current == self._size and self._last_bytes != current)
        )
        if due:
            self._last_time, self._last_bytes = now, current
            self._emit(layer_progress(self._mode, self._total, self._digest, self._size, current))


async def relay(queue: asyncio.Queue[Message], work: Awaitable[object]) -> AsyncIterator[Message]:
    """Yield what ``work`` puts in ``queue`` while it runs; re-raise its error at the end.

    If the consumer stops early (the client went away), ``work`` is cancelled.
    """
    task = asyncio.ensure_future(work)
    try:
        while not task.done() or not queue.empty():
            if not queue.empty():
                yield queue.get_nowait()
                continue
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
            else:
                getter.cancel()
        task.result()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
