"""The front's figures for ``GET /metrics``, and the runners' own, gathered at scrape time.

The front counts requests, the scheduler's loads and evictions, and pulls in a registry of its
own (never prometheus_client's global one: two services in one process count apart). What the
scheduler holds now (runners, memory) is read when scraped. Each live runner is asked for its
figures then too, over its socket, so tokens and latencies cost no traffic as they happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter as Tally
from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from app.logging import get_logger
from app.scheduler.launch import COMPLETION, EMBEDDING, RunnerKey
from app.scheduler.scheduler import Scheduler
from app.scheduler.snapshot import RunnerView
from app.service import exposition
from app.service.backend import BACKEND
from app.store import IndexEntry

log = get_logger("metrics")

PREFIX = "model_runner_"
# A runner that takes longer than this to answer is left out of this scrape.
SCRAPE_TIMEOUT_S = 2.0
UNMATCHED = "unmatched"  # the route label of a request no route took (404, 405)

_LOAD_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_PULL_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

T = TypeVar("T")


@dataclass
class _RequestModel:
    name: str = ""


_REQUEST_MODEL: ContextVar[_RequestModel | None] = ContextVar("request_model", default=None)


@contextlib.contextmanager
def request_scope() -> Iterator[_RequestModel]:
    """For the length of one request: what ``noted`` records in it."""
    seen = _RequestModel()
    token = _REQUEST_MODEL.set(seen)
    try:
        yield seen
    finally:
        _REQUEST_MODEL.reset(token)


def noted(entry: IndexEntry) -> IndexEntry:
    """Record the model the current request resolved to, for its ``model`` label; returns it.
    The label is the model's one name (as its runners are named), not the client's spelling:
    spellings are many, and a label's values must stay few."""
    seen = _REQUEST_MODEL.get()
    if seen is not None:
        seen.name = entry.name
    return entry


class SchedulerMetrics:
    """Loads and evictions, as the scheduler reports them (a SchedulerObserver)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._loads = Counter(
            f"{PREFIX}loads", "Runners started and ready", ["mode"], registry=registry
        )
        self._failures = Counter(
            f"{PREFIX}load_failures",
            "Runners that died or gave up while loading their model",
            ["mode"],
            registry=registry,
        )
        self._duration = Histogram(
            f"{PREFIX}load_duration_seconds",
            "From a runner's start to its first readiness",
            ["mode"],
            buckets=_LOAD_BUCKETS,
            registry=registry,
        )
        self._evictions = Counter(
            f"{PREFIX}evictions",
            "Runners the scheduler stopped of its own accord: for memory, or idle past keep_alive",
            ["mode", "reason"],
            registry=registry,
        )

    def loaded(self, key: RunnerKey, seconds: float) -> None:
        self._loads.labels(key.mode).inc()
        self._duration.labels(key.mode).observe(seconds)

    def load_failed(self, key: RunnerKey) -> None:
        self._failures.labels(key.mode).inc()

    def evicted(self, key: RunnerKey, reason: str) -> None:
        self._evictions.labels(key.mode, reason).inc()


class PullMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._bytes = Counter(
            f"{PREFIX}pull_bytes", "Bytes downloaded from registries", registry=registry
        )
        self._duration = Histogram(
            f"{PREFIX}pull_duration_seconds",
            "How long pulls took, by outcome (success, cached, failed, cancelled)",
            ["outcome"],
            buckets=_PULL_BUCKETS,
            registry=registry,
        )

    def downloaded(self, size: int) -> None:
        self._bytes.inc(size)

    async def timed(self, lines: AsyncIterator[T], cached: bool) -> AsyncIterator[T]:
        """A pull's progress stream, passed through, its duration observed when it ends."""
        started = time.monotonic()
        outcome = "failed"
        try:
            async with contextlib.aclosing(lines) as closing:
                async for line in closing:
                    yield line
            outcome = "cached" if cached else "success"
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"  # the client left
            raise
        finally:
            self._duration.labels(outcome).observe(time.monotonic() - started)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._requests = Counter(
            f"{PREFIX}requests",
            "HTTP requests answered, by route pattern, method, model and status",
            ["route", "method", "model", "status"],
            registry=self.registry,
        )
        self.scheduler = SchedulerMetrics(self.registry)
        self.pulls = PullMetrics(self.registry)

    def request_done(self, route: str, method: str, model: str, status: int) -> None:
        self._requests.labels(route, method, model, str(status)).inc()

    async def exposition(self, scheduler: Scheduler) -> bytes:
        """The front's figures, the scheduler's state and every live runner's own figures."""
        views = scheduler.snapshot()
        live = scheduler.live()
        texts = await asyncio.gather(*(p.metrics(SCRAPE_TIMEOUT_S) for _, p in live))
        scraped = [(v, t) for (v, _), t in zip(live, texts, strict=True) if t is not None]
        # Parsing and writing a few runners' text takes milliseconds: off the event loop.
        return await asyncio.to_thread(self._render, scheduler_families(views), scraped)

    def _render(self, state: list[Metric], scraped: list[tuple[RunnerView, str]]) -> bytes:
        families = [*self.registry.collect(), *state]
        for view, text in scraped:
            labels = {"backend": BACKEND, "model": view.name, "mode": view.key.mode}
            try:
                families.extend(exposition.labelled(text, labels))
            except ValueError as exc:  # a runner's figures are left out, never the rest
                log.warning("unreadable runner metrics", model=view.name, error=str(exc))
        return exposition.render(exposition.merged(families))


def scheduler_families(views: list[RunnerView]) -> list[Metric]:
    """The scheduler's runners as they are now: how many, and their memory estimates."""
    runners = GaugeMetricFamily(
        f"{PREFIX}runners", "Runners, by mode and state (loading, loaded)", labels=["mode", "state"]
    )
    counts = Tally((v.key.mode, "loading" if v.loading else "loaded") for v in views)
    for mode in (COMPLETION, EMBEDDING):
        for state in ("loaded", "loading"):
            runners.add_metric([mode, state], counts[mode, state])
    memory = GaugeMetricFamily(
        f"{PREFIX}memory_estimate_bytes",
        "What each runner is estimated to use, per device (host, CUDA0, ...)",
        labels=["model", "mode", "device"],
    )
    for view in views:
        for device, size in view.memory_by_device.items():
            memory.add_metric([view.name, view.key.mode, device], size)
    return [runners, memory]
