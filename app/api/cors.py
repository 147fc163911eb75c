"""Browser origin checks (spec 1.4): a web page may not drive the API unless it is allowed.

DMR allows its ``DMR_ORIGINS`` plus localhost, 127.0.0.1 and 0.0.0.0 over http and https,
including ``:*`` entries that, by a quirk, never match (it compares strings). Here ``:*`` means
any port and ``*`` alone allows every origin, which is what those entries were meant to say.

What is guarded is decided by the handler the router picked, not by the path as spelled:
``//models/create`` and ``/v1/../models/create`` reach the same handler as ``/models/create``,
and so meet the same check. Only a few read-only handlers (``/``, ``/version``, the health
probes) answer any origin; everything else, unknown paths included, is guarded.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable

from aiohttp import web

from app.api.middleware import Handler
from app.api.responses import plain_error

_DEFAULT_HOSTS = ("localhost", "127.0.0.1", "0.0.0.0")
_READ_ONLY = ("GET", "HEAD")
_ALLOWED = "model_runner.allowed_origin"


def origin_checker(extra: Iterable[str], public: Collection[Handler]) -> web.middleware:  # type: ignore[valid-type]
    """``public``: handlers any origin may GET (what they answer is no secret)."""
    patterns = [
        *(
            f"{scheme}://{host}{port}"
            for scheme in ("http", "https")
            for host in _DEFAULT_HOSTS
            for port in ("", ":*")
        ),
        *extra,
    ]
    allow_all = "*" in patterns
    exact = {p for p in patterns if not p.endswith(":*")}
    any_port = [re.compile(re.escape(p[:-2]) + r":\d{1,5}$") for p in patterns if p.endswith(":*")]

    def allowed(origin: str) -> bool:
        return allow_all or origin in exact or any(r.match(origin) for r in any_port)

    @web.middleware
    async def check_origin(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is None or (
            request.method in _READ_ONLY and request.match_info.handler in public
        ):
            return await handler(request)
        if not allowed(origin):
            return plain_error(403, "Origin not allowed")
        if request.method == "OPTIONS":
            return web.Response(
                status=204,
                headers={
                    "Access-Control-Allow-Origin": origin,
                    "Access-Control-Allow-Credentials": "true",
                    "Access-Control-Allow-Methods": "GET, POST, DELETE",
                    # "*" never covers Authorization: named, for API keys (app/api/auth.py).
                    "Access-Control-Allow-Headers": "*, Authorization",
                    "Vary": "Origin",
                },
            )
        request[_ALLOWED] = origin
        return await handler(request)

    return check_origin


async def add_allow_origin(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: streamed responses get the header too (they prepare themselves)."""
    origin = request.get(_ALLOWED)
    if origin:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
