"""OpenAI inference routes: the runner's answer, streamed back as it comes (spec 5.1)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from app.api import sse
from app.api.inflight import cut_by_shutdown
from app.api.responses import answer_sent, client_left, mark_streaming, read_body, read_json
from app.logging import get_logger
from app.service.inference import ROUTES, InferenceService, RunnerDied

INFERENCE = web.AppKey("inference_service", InferenceService)
log = get_logger("inference")

__all__ = ["INFERENCE", "ROUTES", "handler"]


def _died(message: str) -> dict[str, Any]:
    """DMR's answer when a runner dies under a request (spec 1.5)."""
    return {"type": "error", "code": None, "message": message, "param": None, "sequence_number": 1}


def _is_event_stream(response: web.StreamResponse) -> bool:
    return response.headers.get("Content-Type", "").startswith("text/event-stream")


async def _last_event(response: web.StreamResponse, message: str) -> None:
    """An SSE client reads the error as an event, then a clean end (the SDKs raise it)."""
    with contextlib.suppress(ConnectionResetError):  # unless it has left too
        await response.write(f"data: {json.dumps({'error': _died(message)})}\n\n".encode())


def handler(route: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def infer(request: web.Request) -> web.StreamResponse:
        doc = await read_json(request, "invalid request")
        body = await read_body(request)  # what read_json read, kept by aiohttp: forwarded as is
        preload_only = request.headers.get("X-Preload-Only", "").lower() == "true"
        service = request.app[INFERENCE]
        response: web.StreamResponse | None = None
        try:
            async with service.serve(
                route, body, doc, request.match_info.get("backend"), preload_only
            ) as reply:
                if reply is None:
                    return web.Response(status=200)  # `docker model run -d`: loaded, no answer
                response = web.StreamResponse(status=reply.status, headers=reply.headers)
                await response.prepare(request)
                mark_streaming(request)
                async for chunk in reply.chunks:
                    await response.write(chunk)
                answer_sent(request, response)
        except RunnerDied as exc:
            if response is None:
                return web.json_response(_died(str(exc)), status=500)
            if not _is_event_stream(response):
                raise  # a cut body: the client sees the transfer fail
            await _last_event(response, str(exc))
        except asyncio.CancelledError:
            if response is None or not _is_event_stream(response) or not cut_by_shutdown(request):
                raise
            await _last_event(response, sse.SHUTDOWN)
        except ConnectionResetError:
            # The client left mid-answer (leaving the block above already let go of the runner):
            # nobody is left to tell, and it is no error of ours.
            log.info("client went away mid-answer", route=route)
            assert response is not None
            client_left(request)
            return response
        # A client may hang up as soon as it has read the last event, before the chunked end.
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response

    return infer
