"""``GET /metrics`` (spec 6.3) and the middleware that counts every request for it."""

from __future__ import annotations

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from app.api import openai
from app.api.middleware import Handler, final_status
from app.service.metrics import UNMATCHED, Metrics, request_scope

METRICS = web.AppKey("metrics", Metrics)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def counting(metrics: Metrics) -> web.middleware:  # type: ignore[valid-type]
    """Count each request by the pattern of the route that took it (never the raw path, whose
    values are endless), its method, the model it resolved and the status it got."""

    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        with request_scope() as seen:
            try:
                return await handler(request)
            finally:
                resource = request.match_info.route.resource
                route = resource.canonical if resource is not None else UNMATCHED
                # A method is whatever the client sent (routes such as /version take any): only
                # the known ones become label values.
                method = request.method if resource is not None else ""
                if method not in _METHODS:
                    method = "other" if method else ""
                metrics.request_done(route, method, seen.name, final_status(request))

    return count


async def scrape(request: web.Request) -> web.Response:
    scheduler = request.app[openai.INFERENCE].scheduler
    body = await request.app[METRICS].exposition(scheduler)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})
