"""OpenAI's Responses API routes (spec 2.5, 7.3): thin handlers around app/service/responses.py,
every error in OpenAI's JSON shape (never DMR's plain text).

DMR translates these requests to chat completions and back, and so does this service: the
templates, tool calling and streaming are the runner's one implementation.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator

from aiohttp import web

from app.api import sse
from app.api.middleware import Handler, answering_errors
from app.api.openai import INFERENCE
from app.api.openai_errors import openai_error_answer
from app.api.responses import json_response, read_json
from app.protocols.responses import Turn, item_page, parse_request
from app.protocols.responses_stream import Event
from app.service.backend import check_backend
from app.service.recorder import OPENAI_RESPONSES, request_origin
from app.service.responses import ResponsesService

PREFIXES = (
    "/responses",
    "/v1/responses",
    "/engines/responses",
    "/engines/v1/responses",
    "/engines/{backend}/v1/responses",
)


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


def _frames(events: list[Event]) -> bytes:
    return b"".join(sse.event(e["type"], e) for e in events)


class _ResponsesAPI:
    def __init__(self, service: ResponsesService) -> None:
        self.service = service

    async def create(self, request: web.Request) -> web.StreamResponse:
        backend = request.match_info.get("backend")
        check_backend(backend)
        request_origin.set(OPENAI_RESPONSES)
        doc = await read_json(request, "the request body is not valid JSON")
        asked = parse_request(doc)
        inference = request.app[INFERENCE]
        # Answers name the model as /v1/models lists it, however the request spelled it.
        asked = dataclasses.replace(asked, model=(await inference.resolve(asked.model)).name)
        turn = self.service.begin(asked)
        if not turn.request.stream:
            return json_response(await self.service.answer(inference, turn, backend))
        return await self._stream(request, turn, backend)

    async def _stream(
        self, request: web.Request, turn: Turn, backend: str | None
    ) -> web.StreamResponse:
        inference = request.app[INFERENCE]
        async with self.service.stream(inference, turn, backend) as live:

            async def frames() -> AsyncIterator[bytes]:
                async with contextlib.aclosing(live.events()) as events:
                    async for event in events:
                        yield _frames([event])

            return await sse.relay(request, frames(), lambda cut: _frames(live.cut(cut)))

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
