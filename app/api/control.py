"""``/engines`` control routes and the health probes: thin over ControlService, the backend
probe and the Preloader."""

from __future__ import annotations

from aiohttp import web

from app.api.responses import json_response, read_json
from app.service.backend import BackendProbe
from app.service.control import ControlService
from app.service.preload import Preloader

CONTROL = web.AppKey("control_service", ControlService)
BACKEND = web.AppKey("backend_probe", BackendProbe)
PRELOADER = web.AppKey("preloader", Preloader)


async def status(request: web.Request) -> web.Response:
    return json_response(request.app[BACKEND].status())


async def ps(request: web.Request) -> web.Response:
    return json_response(request.app[CONTROL].ps())


async def df(request: web.Request) -> web.Response:
    return json_response(await request.app[CONTROL].df())


async def unload(request: web.Request) -> web.Response:
    doc = await read_json(request, "invalid request")
    count = await request.app[CONTROL].unload(doc)
    return json_response({"unloaded_runners": count})


async def configure(request: web.Request) -> web.Response:
    doc = await read_json(request, "invalid request")
    await request.app[CONTROL].configure(doc, request.match_info.get("backend"))
    return web.Response(status=202)


async def configs(request: web.Request) -> web.Response:
    return json_response(await request.app[CONTROL].configs(request.query.get("model")))


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    preloader = request.app[PRELOADER]
    ready = preloader.ready
    body = {
        "status": "ready" if ready else "not ready",
        "models": [s.to_json() for s in preloader.states],
    }
    return json_response(body, status=200 if ready else 503)
