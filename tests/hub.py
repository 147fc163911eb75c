"""A Docker-Hub-style front for the test registry, speaking Hub's real protocols: bearer tokens
from a token service named in ``WWW-Authenticate`` (anonymous for pulls, basic credentials for
pushes), and blob downloads redirected to a "CDN" that refuses any Authorization header, as S3
does. Storage and the OCI API behind it are the real CNCF registry."""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import threading
from typing import Self

import aiohttp
from aiohttp import web

from tests.netutil import free_port

_WRITE = {"POST", "PUT", "PATCH", "DELETE"}


class AppThread:
    """An aiohttp app served on loopback from a thread and event loop of its own, for a test to
    use as ``with``; subclasses add their routes."""

    def __init__(self) -> None:
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def _started(self) -> None:
        """Runs on the app's loop once it serves, before ``with`` hands it over."""

    async def _close(self) -> None:
        await self._runner.cleanup()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        self._routes(app)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        self._loop.run_until_complete(self._started())
        self._ready.set()
        self._loop.run_forever()


class HubFront(AppThread):
    def __init__(self, registry_port: int, user: str, password: str) -> None:
        super().__init__()
        self.registry = f"http://127.0.0.1:{registry_port}"
        self.user, self.password = user, password
        self.tokens: dict[str, set[str]] = {}  # token -> actions it allows
        self.cdn_requests = 0
        self.issued_anonymous = 0

    def _routes(self, app: web.Application) -> None:
        app.router.add_get("/token", self._token)
        app.router.add_route("*", "/cdn/{digest}", self._cdn)
        app.router.add_route("*", "/v2/{tail:.*}", self._v2)

    async def _started(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)

    async def _close(self) -> None:
        await self._session.close()
        await super()._close()

    async def _token(self, request: web.Request) -> web.Response:
        scope = request.query.get("scope", "")
        actions = set(scope.rsplit(":", 1)[-1].split(",")) if scope else set()
        auth = request.headers.get("Authorization", "")
        expected = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        if auth:
            if auth != f"Basic {expected}":
                return web.json_response({"details": "incorrect username or password"}, status=401)
        else:
            actions &= {"pull"}  # anonymous users may only pull
            self.issued_anonymous += 1
        token = secrets.token_hex(16)
        self.tokens[token] = actions
        return web.json_response({"token": token, "access_token": token, "expires_in": 300})

    async def _v2(self, request: web.Request) -> web.StreamResponse:
        tail = request.match_info["tail"]
        repo = re.split(r"/(?:manifests|blobs|tags)/", tail)[0]
        need = "push" if request.method in _WRITE else "pull"
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if need not in self.tokens.get(token, set()):
            scope = f"repository:{repo}:{'pull,push' if need == 'push' else 'pull'}"
            challenge = (
                f'Bearer realm="http://{self.host}/token",service="hub.test",scope="{scope}"'
            )
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
                status=401,
                headers={"WWW-Authenticate": challenge},
            )
        blob = re.search(r"/blobs/(sha256:[0-9a-f]{64})$", tail)
        if blob and request.method == "GET":
            location = (
                f"http://{self.host}/cdn/{blob.group(1)}?repo={repo}&sig={secrets.token_hex(8)}"
            )
            raise web.HTTPTemporaryRedirect(location)
        return await self._forward(request, f"{self.registry}/v2/{tail}")

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        self.cdn_requests += 1
        if "Authorization" in request.headers:
            return web.Response(status=400, text="Only one auth mechanism allowed")
        digest, repo = request.match_info["digest"], request.query["repo"]
        return await self._forward(request, f"{self.registry}/v2/{repo}/blobs/{digest}")

    async def _forward(self, request: web.Request, url: str) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("authorization",)}
        body = await request.read()
        async with self._session.request(
            request.method,
            url,
            params=request.query,
            headers=headers,
            data=body or None,
            allow_redirects=False,
        ) as upstream:
            out = web.StreamResponse(status=upstream.status)
            for k, v in upstream.headers.items():
                if k.lower() not in ("transfer-encoding", "content-encoding", "connection"):
                    out.headers[k] = v
            await out.prepare(request)
            async for chunk in upstream.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out
