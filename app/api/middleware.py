"""Request logging and the mapping of errors to DMR's plain-text answers."""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from app import errors
from app.api.responses import CLIENT_LEFT, is_streaming, outcome, plain_error
from app.logging import get_logger
from app.scheduler import errors as scheduler_errors
from app.service.chat import ChatFailed
from app.service.inference import RunnerDied

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
log = get_logger("http")

# The one table from what went wrong to the status a client gets; anything else is a 500.
_STATUS: dict[type[Exception], int] = {
    errors.BadRequest: 400,
    errors.Unauthorized: 401,
    errors.NotFound: 404,
    errors.RequestTimeout: 408,
    errors.Conflict: 409,
    errors.Unsupported: 422,
    errors.InsufficientStorage: 507,
    errors.Unavailable: 503,
    scheduler_errors.QueueFull: 503,
    scheduler_errors.NoMemory: 503,
    scheduler_errors.ShuttingDown: 503,
    scheduler_errors.RunnerBusy: 409,
    scheduler_errors.LoadFailed: 500,
}


_REQUEST_ID = "model_runner.request_id"


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: streamed answers carry the id too (they prepare themselves, before
    the handler returns), so SDKs can report it (the openai SDK's ``_request_id``)."""
    request_id = request.get(_REQUEST_ID)
    if request_id:
        response.headers["X-Request-Id"] = request_id


@web.middleware
async def access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One line per request with its status and duration; the request id goes back as a header."""
    request_id = request[_REQUEST_ID] = request.headers.get("X-Request-Id") or uuid.uuid4().hex[:16]
    structlog.contextvars.bind_contextvars(request_id=request_id)
    start = time.perf_counter()
    try:
        return await handler(request)
    finally:
        log.info(
            "request",
            method=request.method,
            path=request.path,
            status=final_status(request),
            duration_ms=round((time.perf_counter() - start) * 1000, 2),
            remote=request.remote,
        )
        structlog.contextvars.unbind_contextvars("request_id")


_FINAL_STATUS = web.RequestKey("final_status", int)


@web.middleware
async def settle_status(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Decide once the status a request ended with, for the access log and the metrics (both
    outside this middleware): 499 when the client left before its answer was out, whether its
    handler was cancelled or a write failed; the answer's own status when it was all sent, even
    if the client hung up before the handler returned. Any other exception leaves it unset: a
    500 (``final_status``)."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        request[_FINAL_STATUS] = exc.status
        raise
    except asyncio.CancelledError:
        request[_FINAL_STATUS] = outcome(request) or CLIENT_LEFT
        raise
    request[_FINAL_STATUS] = outcome(request) or response.status
    return response


def final_status(request: web.Request) -> int:
    return request.get(_FINAL_STATUS, 500)


@web.middleware
async def error_answers(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Exception as exc:
        if is_streaming(request):
            # Headers and part of the body are out: re-raising makes aiohttp drop the connection
            # without the final chunk, so the client sees a cut transfer, not a clean end.
            log.warning("stream cut short by an error", error=str(exc))
            raise
        answer = _answer(request, exc)
        if answer is None:
            raise
        return answer


def status_of(exc: Exception) -> int | None:
    """The HTTP status for a service or scheduler error (None for any other exception): for
    the APIs that answer errors in their own shapes (Anthropic, Responses)."""
    if isinstance(exc, errors.ServiceError | scheduler_errors.SchedulerError):
        return next((s for cls, s in _STATUS.items() if isinstance(exc, cls)), 500)
    return None


def failure(exc: Exception, invalid: type[Exception] | tuple[()] = ()) -> tuple[int, str]:
    """The status and message of an error, for the APIs that answer in shapes of their own;
    ``invalid`` is that API's own refusal of a request (400). Logged when it is ours (5xx)."""
    status, message = _failure_status(exc, invalid), str(exc)
    if status is None:
        log.error("unhandled error", exc_info=exc)
        return 500, "internal server error"
    if status >= 500:
        log.error("request failed", status=status, error=message)
    return status, message


def _failure_status(exc: Exception, invalid: type[Exception] | tuple[()]) -> int | None:
    if isinstance(exc, invalid):
        return 400
    if isinstance(exc, errors.TooLarge):
        return 413
    if isinstance(exc, ChatFailed):  # the runner's own refusal, its message as it said it
        return exc.status
    if isinstance(exc, RunnerDied):
        return 500
    return status_of(exc)


def answering_errors(render: Callable[[Exception], web.Response]) -> Callable[[Handler], Handler]:
    """For the APIs with error shapes of their own (OpenAI, Anthropic, Ollama): an error before
    the answer starts is ``render``ed, with the ``Retry-After`` it asks for (a full queue);
    once a stream is under way, it is cut as on any route."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def answer(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except Exception as exc:
                if is_streaming(request):
                    raise
                response = render(exc)
                if retry := getattr(exc, "retry_after", None):
                    response.headers["Retry-After"] = str(retry)
                return response

        return answer

    return wrap


def _answer(request: web.Request, exc: Exception) -> web.Response | None:
    """DMR's plain-text answer for an exception; None for aiohttp's own answers (redirects)."""
    status = status_of(exc)
    if status is not None:
        if status == 500:
            log.error("request failed", error=str(exc))
        retry = getattr(exc, "retry_after", None)
        return plain_error(status, str(exc), {"Retry-After": str(retry)} if retry else None)
    if isinstance(exc, web.HTTPNotFound):
        return plain_error(404, _not_found_text(request.path))
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allow = ", ".join(sorted(exc.allowed_methods))
        return plain_error(405, "Method Not Allowed", {"Allow": allow})
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return plain_error(400, "request too large")
    if isinstance(exc, web.HTTPException):
        return None
    log.error("unhandled error", exc_info=exc)
    return plain_error(500, "internal server error")


def _not_found_text(path: str) -> str:
    # DMR's models and engines handlers answer "not found"; the top-level mux says more.
    bare = path.removeprefix("/exp/vDD4.40")
    if bare.startswith(("/models/", "/engines/", "/v1/")):
        return "not found"
    return "404 page not found"
