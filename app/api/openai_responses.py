"""OpenAI's Responses API routes (spec 2.5, 7.3): thin handlers around app/service/responses.py,
every error in OpenAI's JSON shape (never DMR's plain text).

DMR translates these requests to chat completions and back, and so does this service: the
templates, tool calling and streaming are the runner's one implementation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from aiohttp import web

from app.api.inflight import cut_by_shutdown
from app.api.middleware import Handler, answering_errors
from app.api.openai import INFERENCE
from app.api.openai_errors import openai_error_answer
from app.api.responses import json_response, mark_streaming, read_json
from app.logging import get_logger
from app.protocols.responses import Turn, item_page, parse_request
from app.protocols.responses_stream import Event
from app.service.backend import check_backend
from app.service.responses import ResponsesService

log = get_logger("responses")

PREFIXES = (
    "/responses",
    "/v1/responses",
    "/engines/responses",
    "/engines/v1/responses",
    "/engines/{backend}/v1/responses",
)
_SHUTDOWN = "the service is shutting down; this answer was cut short"


def routes() -> list[tuple[str, str, Handler]]:
    """The routes, each prefix's, over one store: one per application."""
    api = _ResponsesAPI(ResponsesService())
    handlers = {
        "POST": (("", api.create),),
        "GET": (("/{id}", api.get), ("/{id}/input_items", api.input_items)),
        "DELETE": (("/{id}", api.delete),),
    }
    return [
        (method, prefix + path, answering_errors(openai_error_answer)(handler))
        for prefix in PREFIXES
        for method, paths in handlers.items()
        for path, handler in paths
    ]


def _sse(event: Event) -> bytes:
    data = json.dumps(event, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


class _ResponsesAPI:
    def __init__(self, service: ResponsesService) -> None:
        self.service = service

    async def create(self, request: web.Request) -> web.StreamResponse:
        backend = request.match_info.get("backend")
        check_backend(backend)
        doc = await read_json(request, "the request body is not valid JSON")
        turn = self.service.begin(parse_request(doc))
        inference = request.app[INFERENCE]
        if not turn.request.stream:
            return json_response(await self.service.answer(inference, turn, backend))
        return await self._stream(request, turn, backend)

    async def _stream(
        self, request: web.Request, turn: Turn, backend: str | None
    ) -> web.StreamResponse:
        inference = request.app[INFERENCE]
        async with self.service.stream(inference, turn, backend) as live:
            response = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            )
            await response.prepare(request)
            mark_streaming(request)
            try:
                async with contextlib.aclosing(live.events()) as events:
                    async for event in events:
                        await response.write(_sse(event))
            except asyncio.CancelledError:
                if not cut_by_shutdown(request):
                    raise  # the client left: leaving the block stops the runner's work
                with contextlib.suppress(ConnectionResetError):
                    for event in live.cut(_SHUTDOWN):
                        await response.write(_sse(event))
            except ConnectionResetError:
                log.info("client went away mid-answer", route="responses")
                return response
        # A client may hang up as soon as it has read the last event, before the chunked end.
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response

    async def get(self, request: web.Request) -> web.StreamResponse:
        check_backend(request.match_info.get("backend"))
        return json_response(self.service.get(request.match_info["id"]).response)

    async def input_items(self, request: web.Request) -> web.StreamResponse:
        check_backend(request.match_info.get("backend"))
        stored = self.service.get(request.match_info["id"])
        return json_response(item_page(stored.input_items, dict(request.query)))

    async def delete(self, request: web.Request) -> web.StreamResponse:
        check_backend(request.match_info.get("backend"))
        response_id = request.match_info["id"]
        self.service.delete(response_id)
        return json_response({"id": response_id, "object": "response.deleted", "deleted": True})
