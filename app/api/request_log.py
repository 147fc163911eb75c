"""``GET /engines/requests`` (spec 6.2): the recorder's records as JSON, or followed as
server-sent events (``Accept: text/event-stream``); and the middleware that tells the recorder
which HTTP request it is recording."""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from app import errors
from app.api import sse
from app.api.middleware import Handler
from app.api.openai import INFERENCE
from app.api.responses import answer_sent, client_left, json_line, mark_streaming
from app.service.recorder import Call, Recorder, current_call, request_origin

RECORDER = web.AppKey("recorder", Recorder)
_CONNECTED = b'event: connected\ndata: {"status": "connected"}\n\n'


@web.middleware
async def call_info(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The request's method, path and User-Agent for any record it leads to; and a fresh
    origin, which a translating API's handler sets."""
    call = current_call.set(
        Call(request.method, request.path, request.headers.get("User-Agent", ""))
    )
    origin = request_origin.set("")
    try:
        return await handler(request)
    finally:
        request_origin.reset(origin)
        current_call.reset(call)


async def requests(request: web.Request) -> web.StreamResponse:
    model_id = await _model_id(request, request.query.get("model"))
    recorder = request.app[RECORDER]
    if "text/event-stream" in request.headers.get("Accept", ""):
        return await _follow(request, recorder, model_id)
    # Up to 10 records of 512 KiB per model: encoded off the loop.
    body = await asyncio.to_thread(json_line, recorder.listing(model_id))
    return web.Response(body=body, content_type="application/json")


async def _model_id(request: web.Request, model: str | None) -> str | None:
    if not model:
        return None
    try:
        return (await request.app[INFERENCE].resolve(model)).id
    except (errors.NotFound, errors.BadRequest):
        return model  # as DMR: a model it does not know has no records, an empty list


async def _follow(
    request: web.Request, recorder: Recorder, model_id: str | None
) -> web.StreamResponse:
    subscription = recorder.subscribe(model_id)
    # Taken with the subscription, no await between: no record is missed or sent twice.
    asked = request.query.get("include_existing") == "true"
    existing = recorder.existing(model_id) if asked else []
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    try:
        await response.prepare(request)
        mark_streaming(request)
        await response.write(_CONNECTED)
        for event in existing:
            await response.write(await asyncio.to_thread(sse.event, "existing_request", event))
        while (event := await subscription.next()) is not None:
            await response.write(await asyncio.to_thread(sse.event, "new_request", event))
    except ConnectionResetError:
        client_left(request)
        return response
    finally:
        recorder.unsubscribe(subscription)
    # Ended by shutdown, or let go for falling behind.
    answer_sent(request, response)
    with contextlib.suppress(ConnectionResetError):
        await response.write_eof()
    return response
