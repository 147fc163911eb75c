"""Streams for the APIs that translate chat completions into their own events: named SSE
events (``event: NAME`` / ``data: JSON``: Anthropic Messages, OpenAI Responses) or JSON lines
(Ollama). One way to frame events, end a stream when the service shuts down, and let a client
leave without a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from app.api.inflight import cut_by_shutdown
from app.api.responses import answer_sent, client_left, mark_streaming
from app.logging import get_logger

log = get_logger("sse")

# The same words as the OpenAI routes' last event when shutdown cuts an answer.
SHUTDOWN = "the service is shutting down; this answer was cut short"


def event(name: str, data: Any) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


EVENT_STREAM = "text/event-stream; charset=utf-8"


async def relay(
    request: web.Request,
    frames: AsyncIterator[bytes],
    cut: Callable[[str], bytes],
    content_type: str = EVENT_STREAM,
) -> web.StreamResponse:
    """Send ``frames`` as a stream. Shutdown ends it with ``cut(SHUTDOWN)``; a client that
    leaves ends it quietly (leaving the caller's block stops the runner's work)."""
    response = web.StreamResponse(
        headers={"Content-Type": content_type, "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    mark_streaming(request)
    try:
        async with contextlib.aclosing(frames):
            async for frame in frames:
                await response.write(frame)
        answer_sent(request, response)
    except asyncio.CancelledError:
        if not cut_by_shutdown(request):
            raise
        with contextlib.suppress(ConnectionResetError):  # unless the client has left too
            await response.write(cut(SHUTDOWN))
    except ConnectionResetError:
        log.info("client went away mid-answer", route=request.path)
        client_left(request)
        return response
    # A client may hang up as soon as it has read the last event, before the chunked end.
    with contextlib.suppress(ConnectionResetError):
        await response.write_eof()
    return response
