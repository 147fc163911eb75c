"""Ollama's API under ``/api`` (spec 2.3, 7.1): thin handlers around app/protocols/ollama.py,
app/service/ollama.py and the service's chat client; every error as Ollama's ``{"error": ...}``,
which its clients show. Streams are JSON lines, the default as in Ollama."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from app import errors
from app.api import sse
from app.api.middleware import Handler, answering_errors, failure
from app.api.models import DISTRIBUTION
from app.api.openai import INFERENCE
from app.api.responses import json_line, json_response, read_json
from app.durations import KeepAlive
from app.protocols import ollama as protocol
from app.scheduler.launch import COMPLETION, EMBEDDING
from app.service.chat import ChatAnswer, ChatFailed, chat
from app.service.inference import RunnerDied
from app.service.ollama import OllamaService, not_found
from app.service.recorder import OLLAMA_COMPLETION, request_origin

OLLAMA = web.AppKey("ollama_service", OllamaService)
NDJSON = "application/x-ndjson"
# What DMR's Ollama layer reports (spec 7.1).
VERSION = "0.1.0"


def _render(exc: Exception) -> web.Response:
    status, message = failure(exc, protocol.InvalidRequest)
    return json_response(protocol.error_body(message), status)


def routes() -> list[tuple[str, str, Handler]]:
    in_ollama_shape = answering_errors(_render)
    table: list[tuple[str, str, Handler]] = [
        ("GET", "version", version),
        ("GET", "tags", tags),
        ("GET", "ps", ps),
        ("POST", "show", show),
        ("POST", "chat", chat_),
        ("POST", "generate", generate),
        ("POST", "embed", embed),
        ("POST", "embeddings", embeddings),
        ("POST", "pull", pull),
        ("POST", "push", push),
        ("DELETE", "delete", delete),
        ("POST", "copy", copy),
    ]
    return [(method, f"/api/{path}", in_ollama_shape(handler)) for method, path, handler in table]


async def version(request: web.Request) -> web.StreamResponse:
    return json_response({"version": VERSION})


async def tags(request: web.Request) -> web.StreamResponse:
    return json_response({"models": await request.app[OLLAMA].tags()})


async def ps(request: web.Request) -> web.StreamResponse:
    return json_response({"models": await request.app[OLLAMA].ps()})


async def show(request: web.Request) -> web.StreamResponse:
    model = protocol.model_name(await _body(request))
    return json_response(await request.app[OLLAMA].show(model))


async def delete(request: web.Request) -> web.StreamResponse:
    model = protocol.model_name(await _body(request))
    await request.app[OLLAMA].delete(model)
    return web.Response(status=200)


async def copy(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    source, destination = body.get("source"), body.get("destination")
    if not isinstance(source, str) or not source.strip():
        raise protocol.InvalidRequest("source is required")
    if not isinstance(destination, str) or not destination.strip():
        raise protocol.InvalidRequest("destination is required")
    await request.app[OLLAMA].copy(source.strip(), destination.strip())
    return web.Response(status=200)


async def _body(request: web.Request) -> dict[str, Any]:
    body = await read_json(request, "the request body is not valid JSON")
    if not isinstance(body, dict):
        raise protocol.InvalidRequest("the request body must be a JSON object")
    return body


# -- generation -------------------------------------------------------------------------------
async def chat_(request: web.Request) -> web.StreamResponse:
    return await _generation(request, protocol.parse_chat(await _body(request)))


async def generate(request: web.Request) -> web.StreamResponse:
    return await _generation(request, protocol.parse_generate(await _body(request)))


async def _generation(
    request: web.Request, asked: protocol.GenerationRequest
) -> web.StreamResponse:
    request_origin.set(OLLAMA_COMPLETION)
    service = request.app[OLLAMA]
    # No prompt: Ollama's way to load a model, or with keep_alive 0 to unload it.
    if asked.body is None and asked.settings.unloads:
        name = await service.unload(asked.model)
        return json_response(protocol.load_answer(name, asked.chat, unloaded=True))
    await service.apply(asked.model, COMPLETION, asked.settings)
    if asked.body is None:
        name = await service.load(asked.model, COMPLETION, asked.settings.keep_alive)
        return json_response(protocol.load_answer(name, asked.chat, unloaded=False))
    answer = protocol.Answer(asked)
    keep_alive = asked.settings.keep_alive
    async with _ask(request, asked.model, asked.body, asked.route, keep_alive) as asking:
        assert asking.chunks is not None
        chunks = asking.chunks
        answer.accepted()
        if not asked.stream:
            async for chunk in chunks:
                answer.feed(chunk)
            if answer.error is not None:
                raise ChatFailed(500, answer.error)
            return json_response(answer.whole())

        async def lines() -> AsyncIterator[bytes]:
            try:
                async for chunk in chunks:
                    yield b"".join(json_line(line) for line in answer.feed(chunk))
                    if answer.error is not None:
                        return
            except RunnerDied as exc:
                yield json_line(protocol.error_body(str(exc)))
                return
            yield json_line(answer.last())

        return await sse.relay(request, lines(), _cut, NDJSON)


def _cut(message: str) -> bytes:
    return json_line(protocol.error_body(message))


@contextlib.asynccontextmanager
async def _ask(
    request: web.Request,
    model: str,
    body: dict[str, Any],
    route: str,
    keep_alive: KeepAlive | None,
) -> AsyncIterator[ChatAnswer]:
    """The runner's answer on ``route``; an unknown model in Ollama's words."""
    inference = request.app[INFERENCE]
    async with contextlib.AsyncExitStack() as stack:
        try:
            answer = await stack.enter_async_context(chat(inference, body, None, route, keep_alive))
        except errors.NotFound:
            raise not_found(model) from None
        yield answer


async def embed(request: web.Request) -> web.StreamResponse:
    return await _embed(request, legacy=False)


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await _embed(request, legacy=True)


async def _embed(request: web.Request, legacy: bool) -> web.StreamResponse:
    started = time.perf_counter_ns()
    request_origin.set(OLLAMA_COMPLETION)
    model, asked, settings = protocol.parse_embed(await _body(request), legacy)
    service = request.app[OLLAMA]
    await service.apply(model, EMBEDDING, settings)
    if asked is None:  # nothing to embed: load the model, as Ollama does
        await service.load(model, EMBEDDING, settings.keep_alive)
        reply: dict[str, Any] = {"data": [], "model": model}
    else:
        async with _ask(request, model, asked, "embeddings", settings.keep_alive) as asking:
            assert asking.body is not None
            reply = asking.body
    answer = protocol.embed_answer(reply, model, started, legacy)
    # Thousands of vectors take the loop long to write: off it, as they were read.
    body = await asyncio.to_thread(json_line, answer) if reply["data"] else json_line(answer)
    return web.Response(body=body, content_type="application/json")


# -- pulls and pushes -------------------------------------------------------------------------
async def pull(request: web.Request) -> web.StreamResponse:
    body, stream = await _transfer_body(request)
    dist = request.app[DISTRIBUTION]
    plan = await dist.prepare_pull(protocol.model_name(body), None)  # errors get a status
    return await _transfer(request, dist.pull(plan), "pull", stream)


async def push(request: web.Request) -> web.StreamResponse:
    body, stream = await _transfer_body(request)
    dist = request.app[DISTRIBUTION]
    try:
        job = await dist.prepare_push(protocol.model_name(body), None)
    except errors.NotFound:
        raise not_found(protocol.model_name(body)) from None
    return await _transfer(request, dist.push(job), "push", stream)


async def _transfer_body(request: web.Request) -> tuple[dict[str, Any], bool]:
    # `insecure` is not honoured: which registries speak plain HTTP is the operator's
    # choice (INSECURE_REGISTRY), not a client's.
    body = await _body(request)
    return body, protocol.wants_stream(body)


async def _transfer(
    request: web.Request, messages: AsyncIterator[dict[str, Any]], mode: str, stream: bool
) -> web.StreamResponse:
    lines = _transfer_lines(messages, mode)
    if not stream:
        last: dict[str, Any] = {}
        async with contextlib.aclosing(lines):
            async for line in lines:
                if "error" in line:
                    raise errors.ServiceError(line["error"])
                last = line
        return json_response(last)

    async def frames() -> AsyncIterator[bytes]:
        async with contextlib.aclosing(lines):
            async for line in lines:
                yield json_line(line)

    return await sse.relay(request, frames(), _cut, NDJSON)


async def _transfer_lines(
    messages: AsyncIterator[dict[str, Any]], mode: str
) -> AsyncIterator[dict[str, Any]]:
    """Ollama's progress lines, ending with ``success`` or an ``error`` line."""
    yield {"status": protocol.TRANSFER_START[mode]}
    try:
        async with contextlib.aclosing(messages):
            async for message in messages:
                for line in protocol.transfer_lines(message, mode):
                    yield line
                    if "error" in line:
                        return
    except errors.ServiceError as exc:
        yield protocol.error_body(str(exc))
        return
    yield {"status": "success"}
