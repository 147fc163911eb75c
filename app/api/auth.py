"""API keys (MODEL_RUNNER_API_KEY): when set, every request but the health probes presents one,
as ``Authorization: Bearer KEY`` (OpenAI's SDKs, curl) or ``x-api-key: KEY`` (Anthropic's).

As with the origin checks (app/api/cors.py), what is exempt is decided by the handler the router
picked, so ``//healthz`` is the probe and ``/exp/vDD4.40/models`` is not. Unknown paths need a key
too: a client without one learns nothing of the routes. The refusal (401) comes in the shape the
path's API uses, so each SDK reports it as an authentication error.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Collection

from aiohttp import web

from app.api.middleware import Handler
from app.api.responses import json_response, plain_error
from app.logging import get_logger
from app.protocols import anthropic
from app.protocols.openai_errors import OpenAIError

log = get_logger("auth")

MESSAGE = "invalid or missing API key"
_CHALLENGE = {"WWW-Authenticate": "Bearer"}
_ANTHROPIC = re.compile(r"^/anthropic/|/v1/messages(/|$)")
_OPENAI = re.compile(r"^/(v1|engines/v1|engines/[^/]+/v1|responses|engines/responses)(/|$)")


def key_checker(
    keys: Collection[str], exempt: Collection[Handler], desktop_prefix: str
) -> web.middleware:  # type: ignore[valid-type]
    """``keys``: those accepted (none: no check); ``exempt``: handlers anyone may call."""
    # Digests compared, not keys: equal lengths, so a comparison's time tells nothing.
    digests = [hashlib.sha256(key.encode()).digest() for key in keys]

    def accepted(presented: str) -> bool:
        digest = hashlib.sha256(presented.encode()).digest()
        found = False
        for known in digests:  # every one, whichever matches
            found |= hmac.compare_digest(digest, known)
        return found

    @web.middleware
    async def check_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not digests or request.match_info.handler in exempt:
            return await handler(request)
        if any([accepted(p) for p in _presented(request)]):
            return await handler(request)
        return _refusal(_api_path(request, desktop_prefix))

    return check_key


def _presented(request: web.Request) -> list[str]:
    presented = []
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        presented.append(token.strip())
    if key := request.headers.get("x-api-key", "").strip():
        presented.append(key)
    return presented


def _api_path(request: web.Request, desktop_prefix: str) -> str:
    """The path as routed: the route's pattern when one matched, else the path as sent with
    its slashes collapsed; without Docker Desktop's prefix."""
    resource = request.match_info.route.resource
    path = resource.canonical if resource is not None else re.sub("/+", "/", request.path)
    return path.removeprefix(desktop_prefix) or "/"


def _refusal(path: str) -> web.Response:
    if path.startswith("/api/"):  # Ollama's
        response = json_response({"error": MESSAGE}, 401)
    elif _ANTHROPIC.search(path):
        response = json_response(anthropic.error_body(401, MESSAGE), 401)
    elif _OPENAI.match(path):  # OpenAI's, its Responses API's too
        response = json_response(OpenAIError(401, MESSAGE, None, "invalid_api_key").body(), 401)
    else:  # DMR's own routes
        return plain_error(401, MESSAGE, _CHALLENGE)
    response.headers.update(_CHALLENGE)
    return response


def warn_if_open(addr: str, keys: Collection[str]) -> None:
    """One warning at start-up when the API is reachable beyond this host with no key."""
    if keys or _loopback(addr):
        return
    log.warning(
        "no API key set and listening beyond loopback: anyone who can reach this port can "
        "pull, push, delete and run models; set MODEL_RUNNER_API_KEY",
        addr=addr,
    )


def _loopback(addr: str) -> bool:
    if addr == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything
