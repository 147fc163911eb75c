"""Streaming DMR progress to a client (spec 3.1): NDJSON, flushed line by line.

DMR sends ``application/json`` only when the client's ``Accept`` is exactly that; otherwise the
lines go out as ``text/plain`` with HTML escaping, which its CLI undoes. A failure after the
first line cannot change the status any more: it becomes a ``type:"error"`` line followed by
a plain-text line, as DMR's handler writes them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from aiohttp import web

from app import errors
from app.distribution import progress
from app.logging import get_logger

log = get_logger("progress")


async def stream_progress(
    request: web.Request, lines: AsyncIterator[progress.Message], mode: str
) -> web.StreamResponse:
    as_json = request.headers.get("Accept") == "application/json"
    response = web.StreamResponse(
        headers={
            "Content-Type": "application/json" if as_json else "text/plain; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
        }
    )
    response.enable_chunked_encoding()
    await response.prepare(request)

    async def send(message: progress.Message) -> None:
        text = json.dumps(message, separators=(",", ":"))
        await response.write(((text if as_json else progress.html_escape(text)) + "\n").encode())

    try:
        async for message in lines:
            await send(message)
    except errors.ServiceError as exc:
        reason = str(exc).split(": ", 1)[-1]
        log.warning("transfer failed", mode=mode, error=str(exc))
        await send(progress.message("error", f"Error: {reason}", mode))
        await response.write((str(exc) + "\n").encode())
    await response.write_eof()
    return response
