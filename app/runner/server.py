"""The runner's HTTP side: OpenAI routes on a Unix socket over one engine (or embedder)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from app.engine.embed import Embedder
from app.engine.engine import Engine, Event, Failed, Finished, Request, Token, TokenLogprob
from app.engine.llama import LlamaError, Model
from app.runner.chat import ChatTemplate, TemplateError
from app.runner.params import (
    ParamError,
    parse_generation,
    parse_inputs,
    parse_messages,
    parse_prompt,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Runtime:
    model: Model
    name: str
    ctx_size: int
    engine: Engine | None = None
    embedder: Embedder | None = None
    template: ChatTemplate | None = None


RUNTIME = web.AppKey("runtime", Runtime)


def openai_error(
    status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"
) -> web.Response:
    body = {"error": {"code": status, "message": message, "type": kind, "param": param}}
    return web.json_response(body, status=status)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ParamError as exc:
        return openai_error(400, str(exc), exc.param)
    except TemplateError as exc:
        return openai_error(400, str(exc), "messages")
    except web.HTTPException as exc:
        return openai_error(exc.status, exc.reason)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ParamError("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ParamError("the request body must be a JSON object")
    return body


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    if rt.engine is None:
        return openai_error(400, "this model runs in embedding mode", kind="invalid_request_error")
    body = await _body(request)
    gen = parse_generation(body, rt.model.info.n_vocab, chat)
    if chat:
        assert rt.template is not None
        text = rt.template.render(parse_messages(body), body.get("tools"))
        bos = rt.model.info.bos_text
        add_bos = rt.model.info.add_bos and not (bos and text.startswith(bos))
        tokens = rt.model.tokenize(text, add_special=add_bos, parse_special=True)
        field = "messages"
    else:
        prompt = parse_prompt(body, rt.model.info.n_vocab)
        tokens = prompt if isinstance(prompt, list) else rt.model.tokenize(prompt, True, True)
        field = "prompt"
    if not tokens:
        raise ParamError(f"the {field} is empty", field)
    if gen.sampling.grammar and not rt.model.grammar_compiles(gen.sampling.grammar):
        raise ParamError("llama.cpp cannot compile the grammar for this schema", "response_format")
    if len(tokens) >= rt.ctx_size:
        raise ParamError(
            f"the prompt is {len(tokens)} tokens, more than the context size of "
            f"{rt.ctx_size} tokens allows (it must leave room for at least one more)",
            field,
        )
    max_tokens = min(gen.max_tokens or rt.ctx_size, rt.ctx_size - len(tokens))
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    job = Request(
        prompt=tokens,
        max_tokens=max_tokens,
        sampling=gen.sampling,
        stop=gen.stop,
        top_logprobs=gen.top_logprobs,
        sink=lambda event: (
            None if loop.is_closed() else loop.call_soon_threadsafe(events.put_nowait, event)
        ),
    )
    rt.engine.submit(job)
    reply = _Reply(
        chat=chat,
        model=rt.name,
        include_usage=gen.include_usage,
        logprobs=gen.top_logprobs is not None,
    )
    try:
        if gen.stream:
            return await reply.stream(request, events)
        return await reply.whole(events)
    finally:
        # Client gone or done: either way the slot is free for the next request at once.
        rt.engine.cancel(job)


class _Reply:
    """OpenAI's response shapes, streamed (SSE) or whole."""

    def __init__(self, chat: bool, model: str, include_usage: bool, logprobs: bool) -> None:
        self.chat = chat
        self.logprobs = logprobs
        self._offset = 0  # characters of completion text so far, for text_offset
        self.model = model
        self.include_usage = include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _choice(
        self,
        text: str | None,
        finish: str | None,
        delta: bool,
        first: bool,
        logprobs: Sequence[TokenLogprob] = (),
    ) -> dict[str, Any]:
        lp = self._format_logprobs(logprobs) if self.logprobs and (logprobs or not delta) else None
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": lp, "finish_reason": finish}
        if delta:
            content: dict[str, Any] = {}
            if first:
                content["role"] = "assistant"
            if text is not None:
                content["content"] = text
            return {"index": 0, "delta": content, "logprobs": lp, "finish_reason": finish}
        return {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": lp,
            "finish_reason": finish,
        }

    def _format_logprobs(self, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        if self.chat:

            def one(token: str, raw: bytes, logprob: float) -> dict[str, Any]:
                return {"token": token, "logprob": logprob, "bytes": list(raw)}

            content = [
                {**one(e.token, e.bytes, e.logprob), "top_logprobs": [one(*t) for t in e.top]}
                for e in entries
            ]
            return {"content": content, "refusal": None}
        offsets = []
        for e in entries:
            offsets.append(self._offset)
            self._offset += len(e.token)
        return {
            "tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{t: lp for t, _, lp in e.top} for e in entries],
            "text_offset": offsets,
        }

    def _envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        kind = self.object + (".chunk" if chunk and self.chat else "")
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "model-runner",
            "choices": choices,
        }

    @staticmethod
    def _usage(done: Finished) -> dict[str, Any]:
        return {
            "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
        }

    async def whole(self, events: asyncio.Queue[Event]) -> web.Response:
        parts: list[str] = []
        logprobs: list[TokenLogprob] = []
        while True:
            event = await events.get()
            if isinstance(event, Token):
                parts.append(event.text)
                logprobs.extend(event.logprobs)
            elif isinstance(event, Failed):
                return openai_error(500, event.message, kind="server_error")
            else:
                choice = self._choice("".join(parts), event.reason, False, False, logprobs)
                body = self._envelope([choice], False)
                body["usage"] = self._usage(event)
                return web.json_response(body)

    async def stream(
        self, request: web.Request, events: asyncio.Queue[Event]
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)

        async def send(payload: dict[str, Any] | str) -> None:
            data = (
                payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
            )
            await response.write(f"data: {data}\n\n".encode())

        def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
            body = self._envelope(choices, True)
            if self.include_usage:
                body["usage"] = None
            return body

        first = True
        if self.chat:  # OpenAI opens with the role and empty content
            await send(chunk([self._choice("", None, True, True)]))
            first = False
        while True:
            event = await events.get()
            if isinstance(event, Token):
                await send(chunk([self._choice(event.text, None, True, first, event.logprobs)]))
                first = False
            elif isinstance(event, Failed):
                await send(
                    {"error": {"code": 500, "message": event.message, "type": "server_error"}}
                )
                break
            else:
                await send(
                    chunk([self._choice(None if self.chat else "", event.reason, True, first)])
                )
                if self.include_usage:
                    body = self._envelope([], True)
                    body["usage"] = self._usage(event)
                    await send(body)
                await send("[DONE]")
                break
        await response.write_eof()
        return response


async def embeddings(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    if rt.embedder is None:
        return openai_error(
            400, "this model runs in completion mode; embeddings need an embedding runner"
        )
    body = await _body(request)
    inputs = parse_inputs(body, rt.model.info.n_vocab)
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise ParamError("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    dims = body.get("dimensions")
    if dims is not None and dims != rt.model.info.n_embd:
        raise ParamError(
            f"'dimensions' is not supported: this model's embeddings have {rt.model.info.n_embd}",
            "dimensions",
        )
    data, used = [], 0
    for i, item in enumerate(inputs):
        tokens = item if isinstance(item, list) else rt.model.tokenize(item, True, True)
        used += len(tokens)
        try:
            vector = await asyncio.to_thread(rt.embedder.embed, tokens)
        except LlamaError as exc:
            raise ParamError(str(exc), "input") from None
        if fmt == "base64":
            encoded: Any = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
        else:
            encoded = vector
        data.append({"object": "embedding", "index": i, "embedding": encoded})
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "model": rt.name,
            "usage": {"prompt_tokens": used, "total_tokens": used},
        }
    )


def create_app(runtime: Runtime) -> web.Application:
    app = web.Application(middlewares=[errors], client_max_size=10 * 1024 * 1024)
    app[RUNTIME] = runtime
    app.router.add_get("/health", health)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    return app
