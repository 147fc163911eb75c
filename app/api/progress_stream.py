"""Streaming DMR progress to a client (spec 3.1): NDJSON, flushed line by line.

DMR sends ``application/json`` only when the client's ``Accept`` is exactly that; otherwise the
lines go out as ``text/plain`` with HTML escaping, which its CLI undoes. A failure after the
first line cannot change the status any more: it becomes a ``type:"error"`` line followed by
a plain-text line, as DMR's handler writes them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

from aiohttp import web

from app import errors
from app.api.responses import answer_sent, client_left, mark_streaming
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
    mark_streaming(request)

    async def send(message: progress.Message) -> None:
        text = json.dumps(message, separators=(",", ":"))
        await response.write(((text if as_json else progress.html_escape(text)) + "\n").encode())

    action = "pulling" if mode == "pull" else "pushing"
    try:
        async with contextlib.aclosing(lines) as closing:
            async for message in closing:
                await send(message)
    except ConnectionResetError:
        # The client went away: closing the stream above stopped the transfer (a pull keeps
        # its partial files for the next one).
        log.info("client went away", mode=mode)
        client_left(request)
        return response
    except Exception as exc:
        # The status line is gone; whatever failed must reach the client inside the stream.
        if isinstance(exc, errors.ServiceError):
            text = str(exc)
            log.warning("transfer failed", mode=mode, error=text)
        else:
            text = f"error while {action} model: internal error: {exc}"
            log.exception("transfer failed", mode=mode)
        reason = text.split(": ", 1)[-1]
        try:
            await send(progress.message("error", f"Error: {reason}", mode))
            await response.write((text + "\n").encode())
        except ConnectionResetError:
            client_left(request)  # it left before it could be told
            return response
    answer_sent(request, response)
    with contextlib.suppress(ConnectionResetError):
        await response.write_eof()
    return response
