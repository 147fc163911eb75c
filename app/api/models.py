"""DMR's model management routes (spec 2.1): thin handlers over ModelService."""

from __future__ import annotations

import asyncio
import io

from aiohttp import web

from app.api.progress_stream import stream_progress
from app.api.responses import (
    client_left,
    json_line,
    json_response,
    mark_streaming,
    plain_error,
    read_json,
)
from app.api.streams import BlockingBodyReader, write_chunks
from app.errors import BadRequest
from app.service.distribution import DistributionService
from app.service.models import ModelService

SERVICE = web.AppKey("model_service", ModelService)
DISTRIBUTION = web.AppKey("distribution_service", DistributionService)


def _service(request: web.Request) -> ModelService:
    return request.app[SERVICE]


def _bool_param(request: web.Request, name: str) -> bool:
    """Go's strconv.ParseBool, with DMR's rule that a bare ``?force`` is true and junk false."""
    if name not in request.query:
        return False
    value = request.query[name]
    return value == "" or value.lower() in ("1", "t", "true")


async def list_models(request: web.Request) -> web.Response:
    return json_response(await _service(request).list_models())


async def get_model(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name.endswith("/export"):
        return await _export(request, name.removesuffix("/export"))
    if _bool_param(request, "remote"):
        return plain_error(501, "inspecting remote models is not implemented yet")
    return json_response(await _service(request).get_model(name))


async def _export(request: web.Request, name: str) -> web.StreamResponse:
    filename, chunks = await _service(request).export(name)
    safe = "".join(c for c in filename if c.isprintable() and c not in '"\\')
    response = web.StreamResponse(
        headers={
            "Content-Type": "application/x-tar",
            "Content-Disposition": f'attachment; filename="{safe}"',
        }
    )
    try:
        await response.prepare(request)
        mark_streaming(request)
        await write_chunks(response, chunks)
        await response.write_eof()
    except ConnectionResetError:
        client_left(request)  # a cut download is the client's doing, not an error of ours
    finally:
        chunks.close()
    return response


async def delete_model(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    force = _bool_param(request, "force")
    return json_response(await _service(request).delete_model(name, force))


async def purge(request: web.Request) -> web.Response:
    await _service(request).purge()
    return web.Response(status=200)


async def model_action(request: web.Request) -> web.StreamResponse:
    """POST /models/{name...}/{action}: the action is the last path segment, as in DMR."""
    name, _, action = request.match_info["name"].rpartition("/")
    if action == "tag" and name:
        repo, tag = request.query.get("repo", ""), request.query.get("tag", "")
        body = await _service(request).tag_model(name, repo, tag)
        return json_response(body, status=201)
    if action == "push" and name:
        return await push_model(request, name)
    if action == "repackage" and name:
        return plain_error(501, "repackage is not implemented yet")
    return plain_error(404, f'unknown action "{action}"')


async def load_model(request: web.Request) -> web.Response:
    if request.headers.get("Content-Encoding", "identity").lower() != "identity":
        # A compressed body could expand without bound; DMR's CLI never compresses it.
        return plain_error(400, "error while loading model: compressed uploads are not accepted")
    reader = io.BufferedReader(BlockingBodyReader(request.content, asyncio.get_running_loop()))
    _, line = await _service(request).load(reader)
    return web.Response(body=json_line(line), content_type="application/json")


async def create_model(request: web.Request) -> web.StreamResponse:
    ref, token = await _transfer_body(request, required=True)
    dist = request.app[DISTRIBUTION]
    plan = await dist.prepare_pull(ref, token)
    return await stream_progress(request, dist.pull(plan), "pull")


async def push_model(request: web.Request, name: str) -> web.StreamResponse:
    _, token = await _transfer_body(request, required=False)
    dist = request.app[DISTRIBUTION]
    job = await dist.prepare_push(name, token)
    return await stream_progress(request, dist.push(job), "push")


async def _transfer_body(request: web.Request, required: bool) -> tuple[str, str | None]:
    """``{"from": ref, "bearer-token": token}``; push allows an empty body (spec 3.1, 3.7)."""
    if not required and not await request.read():
        return "", None
    body = await read_json(request, "invalid request body")
    if not isinstance(body, dict):
        raise BadRequest("invalid request body")
    ref, token = body.get("from", ""), body.get("bearer-token")
    if (required and not isinstance(ref, str)) or not isinstance(token, str | None):
        raise BadRequest("invalid request body")
    return ref, token or None


async def openai_models(request: web.Request) -> web.Response:
    return json_response(await _service(request).openai_models())


async def openai_model(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    return json_response(await _service(request).openai_model(name))
