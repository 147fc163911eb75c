"""OpenAI inference routes: checked here, served by a runner, its bytes streamed back as is."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from app.api.responses import mark_streaming
from app.errors import BadRequest
from app.logging import get_logger
from app.scheduler.runners import Runner
from app.service.inference import InferenceService

INFERENCE = web.AppKey("inference_service", InferenceService)
log = get_logger("inference")

# The path suffix decides the runner's mode and the runner route (spec 5.1).
ROUTES = {
    "chat/completions": "completion",
    "completions": "completion",
    "embeddings": "embedding",
}
_PASSED_HEADERS = ("Content-Type", "Cache-Control")


def _died(message: str) -> dict[str, object]:
    """DMR's answer when a runner dies under a request (spec 1.5)."""
    return {"type": "error", "code": None, "message": message, "param": None, "sequence_number": 1}


class _RunnerGoneBeforeAnswer(Exception):
    pass


async def _proxy(
    request: web.Request, runner: Runner, route: str, body: bytes, retry: bool = True
) -> web.StreamResponse:
    response: web.StreamResponse | None = None
    try:
        async with runner.session.post(
            f"http://runner/v1/{route}",
            data=body,
            headers={"Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        ) as upstream:
            response = web.StreamResponse(status=upstream.status)
            for name in _PASSED_HEADERS:
                if name in upstream.headers:
                    response.headers[name] = upstream.headers[name]
            await response.prepare(request)
            mark_streaming(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
        # A runner that crashed is exiting now; its last words say why.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(runner.proc.wait(), 2)
        if response is None and retry and not runner.alive:
            raise _RunnerGoneBeforeAnswer() from None
        message = f"the model runner failed: {exc}. {runner.tail()}".strip()
        log.error("runner failed mid-request", error=message)
        if response is None:
            return web.json_response(_died(message), status=500)
        if not response.headers.get("Content-Type", "").startswith("text/event-stream"):
            raise  # a cut body: the client sees the transfer fail
        # An SSE client reads the error as an event, then a clean end (the SDKs raise it).
        await response.write(f"data: {json.dumps({'error': _died(message)})}\n\n".encode())
    await response.write_eof()
    return response


def handler(route: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    mode = ROUTES[route]

    async def infer(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise BadRequest("request too large") from None
        service = request.app[INFERENCE]
        entry, name = await service.model_for(body, request.match_info.get("backend"))
        async with service.runner(entry, mode, name) as runner:
            if request.headers.get("X-Preload-Only", "").lower() == "true":
                return web.Response(status=200)  # `docker model run -d`: load, answer nothing
            try:
                return await _proxy(request, runner, route, body)
            except _RunnerGoneBeforeAnswer:
                pass
        # It crashed before this request reached it (another request killed it): a fresh
        # runner can still serve this one.
        async with service.runner(entry, mode, name) as runner:
            return await _proxy(request, runner, route, body, retry=False)

    return infer
