"""Chat completions that the service asks for itself, for the APIs that translate to them.

One internal chat representation: OpenAI's chat completion request, which the runners serve
(templates, tools, grammars, streaming). Anthropic's Messages API and OpenAI's Responses API
translate their requests into it and its answers back into their own shapes, so the engine,
templates and tool-call parsing are written once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from app.durations import KeepAlive
from app.json_body import ON_LOOP_BYTES
from app.protocols.openai_stream import DONE, Payloads
from app.service.inference import InferenceService


class ChatFailed(Exception):
    """The runner refused or failed the request: its status, message and the field it names."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


@dataclass
class ChatAnswer:
    """A whole answer (``body``, OpenAI's chat.completion), or a stream of chunks (``chunks``,
    each a chat.completion.chunk as a dict; an ``{"error": ...}`` one when the runner failed
    mid-stream), never both."""

    body: dict[str, Any] | None
    chunks: AsyncIterator[dict[str, Any]] | None


@contextlib.asynccontextmanager
async def chat(
    inference: InferenceService,
    request: dict[str, Any],
    backend: str | None,
    route: str = "chat/completions",
    keep_alive: KeepAlive | None = None,
) -> AsyncIterator[ChatAnswer]:
    """Ask the model ``request["model"]`` for a chat completion (or, on ``route``, a
    completion or embeddings); ``keep_alive``, the request's own. Raises ChatFailed for an
    answer other than 200, and the inference service's errors (unknown model, full queue)."""
    body = json.dumps(request).encode()
    async with inference.serve(route, body, request, backend, keep_alive=keep_alive) as reply:
        assert reply is not None  # not a preload
        if reply.status != 200:
            raw = b"".join([chunk async for chunk in reply.chunks])
            raise _failure(reply.status, raw)
        if request.get("stream"):
            yield ChatAnswer(None, _events(reply.chunks))
        else:
            raw = b"".join([chunk async for chunk in reply.chunks])
            if len(raw) <= ON_LOOP_BYTES:
                yield ChatAnswer(json.loads(raw), None)
            else:  # many embeddings, say
                yield ChatAnswer(await asyncio.to_thread(json.loads, raw), None)


def _failure(status: int, raw: bytes) -> ChatFailed:
    try:
        error = json.loads(raw)["error"]
        return ChatFailed(status, str(error["message"]), error.get("param"))
    except (ValueError, KeyError, TypeError):
        return ChatFailed(status, raw.decode("utf-8", "replace").strip())


async def _events(chunks: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    """The SSE ``data:`` payloads of a runner's stream, up to ``[DONE]``."""
    payloads = Payloads()  # no bound: the runner sends a tool call whole, in one event
    async for chunk in chunks:
        for payload in payloads.feed(chunk):
            if payload == DONE:
                return
            yield json.loads(payload)
