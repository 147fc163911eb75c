"""DMR's model management routes (spec 2.1): thin handlers over ModelService."""

from __future__ import annotations

import asyncio
import io

from aiohttp import web

from app.api.responses import json_line, json_response, plain_error, read_json
from app.api.streams import BlockingBodyReader, write_chunks
from app.distribution import reference
from app.service.models import ModelService

SERVICE = web.AppKey("model_service", ModelService)


def _service(request: web.Request) -> ModelService:
    return request.app[SERVICE]


def _bool_param(request: web.Request, name: str) -> bool:
    """Go's strconv.ParseBool, with DMR's rule that a bare ``?force`` is true and junk false."""
    if name not in request.query:
        return False
    value = request.query[name]
    return value == "" or value.lower() in ("1", "t", "true")


async def list_models(request: web.Request) -> web.Response:
    return json_response(await asyncio.to_thread(_service(request).list_models))


async def get_model(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name.endswith("/export"):
        return await _export(request, name.removesuffix("/export"))
    if _bool_param(request, "remote"):
        return plain_error(501, "inspecting remote models is not implemented yet")
    return json_response(await asyncio.to_thread(_service(request).get_model, name))


async def _export(request: web.Request, name: str) -> web.StreamResponse:
    filename, chunks = await asyncio.to_thread(_service(request).export, name)
    safe = "".join(c for c in filename if c.isprintable() and c not in '"\\')
    response = web.StreamResponse(
        headers={
            "Content-Type": "application/x-tar",
            "Content-Disposition": f'attachment; filename="{safe}"',
        }
    )
    await response.prepare(request)
    await write_chunks(response, chunks)
    await response.write_eof()
    return response


async def delete_model(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    force = _bool_param(request, "force")
    return json_response(await asyncio.to_thread(_service(request).delete_model, name, force))


async def purge(request: web.Request) -> web.Response:
    await asyncio.to_thread(_service(request).purge)
    return web.Response(status=200)


async def model_action(request: web.Request) -> web.Response:
    """POST /models/{name...}/{action}: the action is the last path segment, as in DMR."""
    name, _, action = request.match_info["name"].rpartition("/")
    if action == "tag" and name:
        repo, tag = request.query.get("repo", ""), request.query.get("tag", "")
        body = await asyncio.to_thread(_service(request).tag_model, name, repo, tag)
        return json_response(body, status=201)
    if action in ("push", "repackage") and name:
        return plain_error(501, f"{action} is not implemented yet")
    return plain_error(404, f'unknown action "{action}"')


async def load_model(request: web.Request) -> web.Response:
    reader = io.BufferedReader(BlockingBodyReader(request.content, asyncio.get_running_loop()))
    _, line = await asyncio.to_thread(_service(request).load, reader)
    return web.Response(body=json_line(line), content_type="application/json")


async def create_model(request: web.Request) -> web.Response:
    body = await read_json(request, "invalid request body")
    ref = body.get("from") if isinstance(body, dict) else None
    if not isinstance(ref, str):
        return plain_error(400, "invalid request body")
    try:
        _service(request).store.parse_reference(ref)
    except reference.InvalidReference:
        return plain_error(400, "Invalid model reference")
    return plain_error(501, "error while pulling model: registry pulls are not implemented yet")


async def openai_models(request: web.Request) -> web.Response:
    return json_response(await asyncio.to_thread(_service(request).openai_models))


async def openai_model(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    return json_response(await asyncio.to_thread(_service(request).openai_model, name))
