"""Anthropic's Messages API (spec 2.4, 7.2): thin handlers around app/protocols/anthropic.py and
the service's chat client, every error in Anthropic's shape.

DMR forwards these requests to llama-server, which speaks the Messages API itself; here they are
translated to chat completions, so that templates, tools and streaming are the runner's one
implementation. ``anthropic-version`` is accepted and ignored; ``x-api-key`` is checked
only when MODEL_RUNNER_API_KEY is set (app/api/auth.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator

from aiohttp import web

from app import errors
from app.api import sse
from app.api.middleware import Handler, answering_errors, failure
from app.api.openai import INFERENCE
from app.api.responses import json_response, read_json
from app.logging import get_logger
from app.protocols import anthropic as protocol
from app.service.backend import check_backend
from app.service.chat import ChatAnswer, chat
from app.service.inference import RunnerDied
from app.service.recorder import ANTHROPIC_MESSAGES, request_origin

log = get_logger("anthropic")

# Anthropic's SDKs call {base_url}/v1/messages: DMR documents http://host:12434 as base URL,
# and serves these under its scheduler's paths too.
PREFIXES = ("/anthropic/v1", "/v1", "/engines/v1", "/engines/{backend}/v1")


def routes() -> list[tuple[str, str, Handler]]:
    return [
        ("POST", f"{prefix}/{path}", handler)
        for prefix in PREFIXES
        for path, handler in (("messages", messages), ("messages/count_tokens", count_tokens))
    ]


def _render(exc: Exception) -> web.Response:
    """Any error before the answer starts as Anthropic's error object, never DMR's text."""
    status, message = failure(exc, protocol.InvalidRequest)
    return web.json_response(protocol.error_body(status, message), status=status)


_anthropic_errors = answering_errors(_render)


async def _request(request: web.Request, counting: bool = False) -> protocol.MessagesRequest:
    check_backend(request.match_info.get("backend"))  # first: a 404 below is then the model's
    body = await read_json(request, "the request body is not valid JSON")
    asked = protocol.parse_request(body, counting)
    try:
        entry = await request.app[INFERENCE].resolve(asked.model)
    except errors.NotFound:
        raise errors.NotFound(f"model: {asked.model} not found") from None
    # Answers name the model as /v1/models lists it, however the request spelled it.
    return dataclasses.replace(asked, model=entry.name)


@contextlib.asynccontextmanager
async def _ask(request: web.Request, asked: protocol.MessagesRequest) -> AsyncIterator[ChatAnswer]:
    request_origin.set(ANTHROPIC_MESSAGES)
    backend = request.match_info.get("backend")
    async with chat(request.app[INFERENCE], asked.chat, backend) as answer:
        yield answer


@_anthropic_errors
async def messages(request: web.Request) -> web.StreamResponse:
    asked = await _request(request)
    async with _ask(request, asked) as answer:
        if answer.chunks is None:
            assert answer.body is not None
            return json_response(protocol.message(answer.body, asked))
        return await _stream(request, answer.chunks, protocol.StreamTranslator(asked))


@_anthropic_errors
async def count_tokens(request: web.Request) -> web.StreamResponse:
    async with _ask(request, await _request(request, counting=True)) as answer:
        assert answer.body is not None
        return json_response({"input_tokens": protocol.input_tokens(answer.body)})


async def _stream(
    request: web.Request, chunks: AsyncIterator[dict], translator: protocol.StreamTranslator
) -> web.StreamResponse:
    async def frames() -> AsyncIterator[bytes]:
        yield _frames(translator.start())
        try:
            async for chunk in chunks:
                yield _frames(translator.feed(chunk))
                if translator.failed:
                    return
        except RunnerDied as exc:
            yield _frames([protocol.error_event(500, str(exc))])
            return
        yield _frames(translator.finish())

    return await sse.relay(request, frames(), lambda cut: _frames([protocol.error_event(503, cut)]))


def _frames(events: list[protocol.Event]) -> bytes:
    return b"".join(sse.event(name, data) for name, data in events)
