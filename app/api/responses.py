"""Response helpers matching DMR's Go server byte for byte where clients may care."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from app import json_body
from app.errors import BadRequest, RequestTimeout, TooLarge


def plain_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """Go's ``http.Error``: text/plain, nosniff, the message plus a newline."""
    return web.Response(
        status=status,
        text=message + "\n",
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Content-Type-Options": "nosniff", **(headers or {})},
    )


def json_response(value: Any, status: int = 200) -> web.Response:
    """Go's ``json.Encoder``: compact JSON and a trailing newline."""
    return web.Response(
        status=status,
        body=json_line(value),
        content_type="application/json",
    )


def json_line(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"


# MODEL_RUNNER_REQUEST_TIMEOUT: a client that sends its body a byte at a time must not hold
# a connection (and its file descriptor) for ever.
REQUEST_TIMEOUT = web.AppKey("request_timeout", float)


async def read_body(request: web.Request) -> bytes:
    """The request's whole body, over the size cap a 400, not received in time a 408."""
    timeout = request.app[REQUEST_TIMEOUT]
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise TooLarge("request too large") from None
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {timeout:g} s (MODEL_RUNNER_REQUEST_TIMEOUT)"
        ) from None


async def read_json(request: web.Request, invalid: str) -> Any:
    """The request's JSON body; over the size cap or malformed, a 400 with DMR's text."""
    raw = await read_body(request)
    try:
        if len(raw) <= json_body.ON_LOOP_BYTES:
            return json_body.parse(raw)
        return await asyncio.to_thread(json_body.parse, raw)
    except json_body.InvalidJSON:
        raise BadRequest(invalid) from None


_STREAMING = "model_runner.response_started"


def mark_streaming(request: web.Request) -> None:
    """From here on the status is sent: an error can only cut the stream short, not replace it."""
    request[_STREAMING] = True


def is_streaming(request: web.Request) -> bool:
    return bool(request.get(_STREAMING))


_OUTCOME = web.RequestKey("outcome", int)
CLIENT_LEFT = 499  # nginx's "client closed request"


def answer_sent(request: web.Request, response: web.StreamResponse) -> None:
    """A stream's last byte is out: a client that hangs up from here on (the openai SDK does on
    ``[DONE]``, before the chunked end) was answered, with this status."""
    request[_OUTCOME] = response.status


def client_left(request: web.Request) -> None:
    """The client went away before its answer was out, however the handler noticed."""
    request[_OUTCOME] = CLIENT_LEFT


def outcome(request: web.Request) -> int | None:
    """What a streaming handler said of how its answer ended, if it said."""
    return request.get(_OUTCOME)
