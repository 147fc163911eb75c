"""The runner's aiohttp application: OpenAI routes on a Unix socket over one engine or embedder.

Handlers stay thin: read the body, let serving do the work, render through protocol.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from app.engine.engine import Failed, Finished
from app.json_body import InvalidJSON, parse_object
from app.runner import serving
from app.runner.chat import TemplateError, TemplateFailed
from app.runner.params import ParamError
from app.runner.protocol import Reply, embeddings_body, error_body, sse
from app.runner.serving import Collected, InFlight, Runtime

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

RUNTIME = web.AppKey("runtime", Runtime)


def openai_error(
    status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"
) -> web.Response:
    return web.json_response(error_body(status, message, param, kind), status=status)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ParamError as exc:
        return openai_error(400, str(exc), exc.param)
    except InvalidJSON as exc:
        return openai_error(400, str(exc))
    except TemplateError as exc:
        return openai_error(400, str(exc), "messages")
    except TemplateFailed as exc:
        return openai_error(500, str(exc), kind="server_error")
    except web.HTTPException as exc:
        return openai_error(exc.status, exc.reason)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[RUNTIME].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    # Checked before the body is read, so an embedding runner refuses whatever is sent.
    engine = rt.require_engine()
    body = await _body(request)
    async with serving.generate(rt, engine, body, chat) as flight:
        reply = Reply(
            chat=chat,
            model=rt.name,
            include_usage=flight.params.include_usage,
            logprobs=flight.params.top_logprobs is not None,
        )
        if flight.params.stream:
            return await _stream(request, reply, flight)
        result = await flight.collect()
        if isinstance(result, Collected):
            return web.json_response(
                reply.whole(result.text, result.logprobs, result.done, result.calls)
            )
        return openai_error(500, result.message, kind="server_error")


async def _stream(request: web.Request, reply: Reply, flight: InFlight) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    try:
        for payload in reply.stream_start():
            await response.write(sse(payload))
        async for batch in flight.batches():
            frames = b"".join(sse(p) for event in batch for p in reply.stream_event(event))
            if batch and isinstance(batch[-1], Finished | Failed):
                # The last events and the body's end in one write: the front sees the end with
                # them, before a client that hangs up on [DONE] can cut its relay short.
                await response.write_eof(frames)
            else:
                await response.write(frames)
    except ConnectionResetError:
        pass  # the client left between two events: nobody to tell, and the job is cancelled
    return response


async def embeddings(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    # Checked before the body is read, so a completion runner refuses whatever is sent.
    embedder = rt.require_embedder()
    result = await serving.embed(rt, embedder, await _body(request))
    return web.json_response(
        embeddings_body(result.vectors, result.encoding, rt.name, result.prompt_tokens)
    )


async def _body(request: web.Request) -> dict[str, Any]:
    # Off the event loop: a body may be 10 MiB of JSON, and streams wait while the loop parses.
    return await asyncio.to_thread(parse_object, await request.read())


def create_app(runtime: Runtime) -> web.Application:
    app = web.Application(middlewares=[errors], client_max_size=10 * 1024 * 1024)
    app[RUNTIME] = runtime
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    return app
