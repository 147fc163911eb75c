"""The aiohttp application: routes, DMR's path aliases, listeners and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import posixpath
import re
import resource
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import prometheus_client
from aiohttp import web

from app import __version__
from app.api import anthropic, control, models, ollama, openai, openai_responses, request_log
from app.api.auth import key_checker, warn_if_open
from app.api.cors import add_allow_origin, origin_checker
from app.api.inflight import CANCEL_GRACE_S, IN_FLIGHT, InFlight
from app.api.metrics import METRICS, counting, scrape
from app.api.middleware import (
    access_log,
    add_request_id,
    answering_errors,
    error_answers,
    settle_status,
)
from app.api.openai_errors import openai_error_answer
from app.api.responses import REQUEST_TIMEOUT, json_response
from app.logging import get_logger
from app.preload_manifest import ModelEntry
from app.scheduler.launch import Defaults
from app.scheduler.process import RunnerLauncher
from app.scheduler.scheduler import Limits, Scheduler
from app.service.backend import BackendProbe
from app.service.control import ControlService
from app.service.distribution import DistributionService
from app.service.inference import InferenceService
from app.service.metrics import Metrics
from app.service.models import ModelService
from app.service.ollama import OllamaService
from app.service.preload import Preloader
from app.service.recorder import Recorder
from app.settings import Settings
from app.store import ModelStore

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
log = get_logger("server")

_REFUSAL_LOG_EVERY_S = 10.0
# Docker Desktop's socket proxy adds this prefix; clients that talk to it send it (spec 1.2).
DESKTOP_PREFIX = "/exp/vDD4.40"
# OpenAI routes live under each of these: /engines/llama.cpp/v1, /engines/v1 and /v1.
OPENAI_PREFIXES = ("/engines/{backend}/v1", "/engines/v1", "/v1")


async def root(request: web.Request) -> web.Response:
    return web.Response(text="Docker Model Runner is running")


async def version(request: web.Request) -> web.Response:
    return json_response({"version": __version__})


# Read-only answers any web page may fetch (DMR leaves "/" and "/version" unguarded too).
PUBLIC = (root, version, control.healthz, control.readyz)
# What answers without an API key: orchestrators probe with none.
HEALTH_PROBES = (control.healthz, control.readyz)


def _routes(with_metrics: bool) -> list[tuple[str, str, Handler]]:
    routes: list[tuple[str, str, Handler]] = [
        ("GET", "/", root),
        ("*", "/version", version),
        ("GET", "/healthz", control.healthz),
        ("GET", "/readyz", control.readyz),
        ("GET", "/engines/status", control.status),
        ("GET", "/engines/ps", control.ps),
        ("GET", "/engines/df", control.df),
        ("POST", "/engines/unload", control.unload),
        ("POST", "/engines/_configure", control.configure),
        ("POST", "/engines/{backend}/_configure", control.configure),
        ("GET", "/engines/_configure", control.configs),
        ("GET", "/engines/requests", request_log.requests),
        ("GET", "/models", models.list_models),
        ("POST", "/models/create", models.create_model),
        ("POST", "/models/load", models.load_model),
        ("DELETE", "/models/purge", models.purge),
        ("GET", "/models/{name:.+}", models.get_model),
        ("DELETE", "/models/{name:.+}", models.delete_model),
        ("POST", "/models/{name:.+}", models.model_action),
    ]
    # Errors there in OpenAI's shape, which its SDKs read the reason from.
    in_openai_shape = answering_errors(openai_error_answer)
    for prefix in OPENAI_PREFIXES:
        routes.append(("GET", f"{prefix}/models", in_openai_shape(models.openai_models)))
        routes.append(("GET", f"{prefix}/models/{{name:.+}}", in_openai_shape(models.openai_model)))
        for route in openai.ROUTES:
            routes.append(("POST", f"{prefix}/{route}", in_openai_shape(openai.handler(route))))
    routes.extend(anthropic.routes())
    routes.extend(openai_responses.routes())
    routes.extend(ollama.routes())
    if with_metrics:  # DISABLE_METRICS leaves it out
        routes.append(("GET", "/metrics", scrape))
    return routes


class _CleanPathRouter(web.UrlDispatcher):
    """DMR's NormalizedServeMux: a path with ``//`` is cleaned, then routed (no redirect)."""

    async def resolve(self, request: web.Request) -> web.UrlMappingMatchInfo:
        path = request.rel_url.path
        if "//" in path:
            cleaned = posixpath.normpath(re.sub("/+", "/", path))
            request = request.clone(rel_url=request.rel_url.with_path(cleaned))
        return await super().resolve(request)


def create_app(
    settings: Settings, entries: list[ModelEntry] | None = None, store: ModelStore | None = None
) -> web.Application:
    in_flight = InFlight()
    metrics = Metrics()
    app = web.Application(
        router=_CleanPathRouter(),
        middlewares=[
            in_flight.track,
            access_log,
            counting(metrics),
            settle_status,
            origin_checker(settings.origins, PUBLIC),  # before keys: preflights carry none
            key_checker(settings.api_keys, HEALTH_PROBES, DESKTOP_PREFIX),
            error_answers,
            request_log.call_info,
        ],
        client_max_size=settings.max_body_bytes,
    )
    app[IN_FLIGHT] = in_flight
    app[METRICS] = metrics
    app[REQUEST_TIMEOUT] = settings.request_timeout
    recorder = app[request_log.RECORDER] = Recorder()
    app.on_response_prepare.append(add_allow_origin)
    app.on_response_prepare.append(add_request_id)
    store = store or ModelStore(settings.models_path, settings.default_registry)
    app[models.SERVICE] = ModelService(store)

    async def registry_session(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            app[models.DISTRIBUTION] = DistributionService(store, settings, session, metrics.pulls)
            yield

    app.cleanup_ctx.append(registry_session)

    async def inference_stack(app: web.Application) -> AsyncIterator[None]:
        launcher = RunnerLauncher()
        probe = app[control.BACKEND] = BackendProbe(settings.gpu_layers)
        scheduler = Scheduler(
            _defaults(settings),
            _limits(settings),
            launcher,
            devices=probe.gpus,
            on_stop=lambda key: recorder.forget(key.model_id),  # DMR drops them with the runner
            observer=metrics.scheduler,
        )
        inference = app[openai.INFERENCE] = InferenceService(store, scheduler, recorder)
        control_service = app[control.CONTROL] = ControlService(store, inference)
        app[ollama.OLLAMA] = OllamaService(store, app[models.SERVICE], control_service)
        preloader = app[control.PRELOADER] = Preloader(
            entries or [], store, app[models.DISTRIBUTION], inference
        )
        background = [asyncio.create_task(probe.run()), asyncio.create_task(preloader.run())]
        yield
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await control_service.close()
        await scheduler.close()
        launcher.close()

    app.cleanup_ctx.append(inference_stack)
    for method, path, handler in _routes(not settings.disable_metrics):
        for prefixed in (path, DESKTOP_PREFIX + path):
            if method == "GET":
                app.router.add_get(prefixed, handler)  # GET routes answer HEAD too, as Go's mux
            else:
                app.router.add_route(method, prefixed, handler)
    return app


def _defaults(settings: Settings) -> Defaults:
    return Defaults(
        parallel=settings.parallel,
        threads=settings.threads,
        gpu_layers=settings.gpu_layers,
        keep_alive=settings.keep_alive,
    )


def _limits(settings: Settings) -> Limits:
    return Limits(
        memory=settings.memory_limit,
        max_queue=settings.max_queue,
        gpu_memory=settings.gpu_memory_limit,
    )


def _raise_open_files_limit() -> int:
    """Each connection, and each request to a runner, holds a file descriptor: take the hard
    limit rather than the (often 1024) soft one, as Go programs such as DMR do at start.
    Returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _cap_connections(web_runner: web.AppRunner, cap: int) -> None:
    """aiohttp accepts every connection: past ``cap`` open at once, a new one is closed as soon
    as it is made, so that a flood of idle clients cannot use up the file descriptors that the
    service's own requests to its runners need."""
    server = web_runner.server
    assert server is not None
    admit = server.connection_made
    refused = 0
    last_said = 0.0

    def connection_made(handler: Any, transport: asyncio.Transport) -> None:
        nonlocal refused, last_said
        admit(handler, transport)
        if len(server.connections) <= cap:
            return
        transport.abort()
        refused += 1
        now = time.monotonic()
        if now - last_said >= _REFUSAL_LOG_EVERY_S:  # one line per burst, with a count
            log.warning("too many connections; refusing new ones", limit=cap, refused=refused)
            last_said, refused = now, 0

    server.connection_made = connection_made  # type: ignore[method-assign]


async def serve(settings: Settings, entries: list[ModelEntry] | None = None) -> None:
    """Run until SIGTERM or SIGINT, on TCP and, when configured, on a Unix socket."""
    # A ``_created`` series beside each counter and histogram, which Go's clients (DMR's) never
    # write in this format, would double /metrics for nothing Prometheus reads.
    prometheus_client.disable_created_metrics()
    app = create_app(settings, entries)
    # On SIGTERM the listeners close at once; requests in flight (streams included) get
    # shutdown_timeout to finish, then are cut (app/api/inflight.py); aiohttp's own wait then
    # only closes idle connections.
    # handler_cancellation: a client that goes away cancels its request, so an inference stops
    # within a decode step and a pull stops downloading.
    # keepalive_timeout also bounds how long a new connection may take to send its headers
    # (aiohttp arms it at connect): a byte-a-second client is dropped, not kept for ever.
    web_runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=CANCEL_GRACE_S,
        handler_cancellation=True,
        keepalive_timeout=settings.request_timeout,
    )
    warn_if_open(settings.addr, settings.api_keys)
    open_files = _raise_open_files_limit()
    await web_runner.setup()
    # Half the descriptors for clients (each request to a runner holds a second one).
    _cap_connections(
        web_runner, settings.max_connections or max(64, min(4096, (open_files - 256) // 2))
    )
    sites: list[web.BaseSite] = [web.TCPSite(web_runner, settings.addr, settings.port)]
    if settings.sock is not None:
        settings.sock.parent.mkdir(parents=True, exist_ok=True)
        settings.sock.unlink(missing_ok=True)  # a stale socket from a killed run blocks bind()
        sites.append(web.UnixSite(web_runner, str(settings.sock)))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        for site in sites:
            await site.start()
        extra_ports = []
        for port in settings.extra_ports:
            try:
                await web.TCPSite(web_runner, settings.addr, port).start()
            except OSError as exc:  # the main port works; say why this one does not
                log.warning("extra port unavailable", port=port, error=str(exc))
            else:
                extra_ports.append(port)
        log.info(
            "listening",
            tcp=f"{settings.addr}:{settings.port}",
            extra_ports=extra_ports or None,
            unix=str(settings.sock) if settings.sock else None,
            models_path=str(settings.models_path),
            version=__version__,
        )
        await stop.wait()
        log.info("shutting down", drain_timeout_s=settings.shutdown_timeout)
        for site in list(web_runner.sites):
            await site.stop()  # no new connections from here on
        app[request_log.RECORDER].close()  # its followers' streams never end by themselves
        await app[IN_FLIGHT].drain(settings.shutdown_timeout)
    finally:
        await web_runner.cleanup()
        if settings.sock is not None:
            settings.sock.unlink(missing_ok=True)
