"""Which runners live: one process per (model, mode), loaded on demand, kept while useful.

- Loads of the same runner are shared; requests to a loaded runner go straight to it and its
  engine queues what exceeds its slots, up to ``max_queue`` waiting requests (then refused).
- Before a load, the runner's memory is estimated from its GGUF; the sum over resident runners
  stays under ``memory_limit``. Room is made by stopping idle runners, least recently used
  first, then by draining busy ones (no new requests, in-flight ones finish) - but never one
  that has requests waiting, nor a pinned one. What cannot fit is refused with the numbers.
- Idle runners leave after their keep_alive (0: at once, None: never).
- A runner that died (llama.cpp abort, OOM kill) is started again on the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from app.durations import KeepAlive
from app.logging import get_logger
from app.scheduler import budget, memory, refusals
from app.scheduler.configs import ModelConfigs
from app.scheduler.devices import Device
from app.scheduler.errors import LoadFailed, QueueFull, RunnerBusy, ShuttingDown
from app.scheduler.failures import LoadFailures
from app.scheduler.launch import (
    Defaults,
    LaunchSpec,
    ModelFiles,
    RunnerKey,
    default_slots,
    plan,
)
from app.scheduler.observer import FOR_MEMORY, KEEP_ALIVE, SchedulerObserver, Unobserved
from app.scheduler.process import RunnerProcess, describe_exit
from app.scheduler.resident import Plan, Resident
from app.scheduler.runner_config import RunnerConfig
from app.scheduler.snapshot import RunnerView
from app.sizes import MIB

log = get_logger("scheduler")

STOP_TIMEOUT_S = 10
# At shutdown the requests have had their time already (the HTTP server drained them).
SHUTDOWN_STOP_TIMEOUT_S = 1.5
# How long a load waits for a busy runner to finish its requests before giving up.
DRAIN_TIMEOUT_S = 60

ProcessFactory = Callable[[LaunchSpec, memory.Estimate], Awaitable[RunnerProcess]]
# Blocking (it reads the GGUF header): the spec, the GPUs and each device's budget.
Estimator = Callable[[LaunchSpec, tuple[Device, ...], Mapping[str, int]], memory.Estimate]
DeviceSource = Callable[[], Awaitable[tuple[Device, ...]]]
Timer = Callable[[float, Callable[[], None]], asyncio.TimerHandle]


@dataclass(frozen=True)
class Limits:
    memory: int  # bytes the runners' estimates may add up to on the host
    max_queue: int  # requests waiting beyond a runner's slots
    gpu_memory: str = "90%"  # of each GPU: a size, or a share of its total


async def no_gpus() -> tuple[Device, ...]:
    return ()


@dataclass
class _Loading:
    plan: Plan
    task: asyncio.Task[Resident]
    admitted: bool = False  # its memory is counted from then on


def estimate_from_gguf(
    spec: LaunchSpec, gpus: tuple[Device, ...], budgets: Mapping[str, int]
) -> memory.Estimate:
    return memory.estimate(
        spec.files.shards, spec.context_size, spec.parallel, gpus, spec.gpu_layers, budgets
    )


class Scheduler:
    def __init__(
        self,
        defaults: Defaults,
        limits: Limits,
        start_process: ProcessFactory,
        estimate: Estimator = estimate_from_gguf,
        devices: DeviceSource = no_gpus,
        configs: ModelConfigs | None = None,
        timer: Timer | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_stop: Callable[[RunnerKey], None] | None = None,
        observer: SchedulerObserver | None = None,
    ) -> None:
        self.defaults = defaults
        self.limits = limits
        self.configs = configs or ModelConfigs()
        self._start_process = start_process
        self._estimate = estimate
        self._devices = devices
        self._gpus: tuple[Device, ...] = ()  # as last found
        self._timer = timer
        self._observer = observer or Unobserved()
        self._on_stop = on_stop  # told of each runner stopped (evicted, idle, died, unloaded)
        self._failed_loads = LoadFailures(clock)
        self._residents: dict[RunnerKey, Resident] = {}
        self._loading: dict[RunnerKey, _Loading] = {}
        self._wanted: Counter[RunnerKey] = Counter()  # requests waiting for a runner to load
        self._stopping: set[Resident] = set()  # still holding their memory until they exit
        self._admission = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    # -- requests ------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lease(
        self,
        key: RunnerKey,
        name: str,
        files: Callable[[], ModelFiles],
        keep_alive: KeepAlive | None = None,
    ) -> AsyncIterator[RunnerProcess]:
        """The runner for a request, counted as in use (never evicted) until the block ends.
        ``files`` (blocking) is called only when the runner has to be started. The request's
        own ``keep_alive``, if any, is how long the runner stays idle after it (else the
        model's configured one)."""
        self._check_queue(key, name)
        self._wanted[key] += 1
        try:
            resident = await self._get(key, name, files)
        finally:
            self._wanted[key] -= 1
        resident.in_use += 1
        resident.idle.clear()
        if resident.expiry is not None:
            resident.expiry.cancel()
            resident.expiry = None
        try:
            yield resident.process
        finally:
            resident.keep_alive = (
                keep_alive.seconds if keep_alive is not None else resident.plan.spec.keep_alive
            )
            self._release(resident)

    def _check_queue(self, key: RunnerKey, name: str) -> None:
        resident = self._residents.get(key)
        loading = self._loading.get(key)
        plan_ = resident.plan if resident else loading.plan if loading else None
        # Before its first plan, a runner's slots are the defaults' (the GPUs' once known).
        slots = (
            plan_.spec.parallel if plan_ else self.defaults.parallel or default_slots(self._gpus)
        )
        pending = (resident.in_use if resident else 0) + self._wanted[key]
        if pending >= slots + self.limits.max_queue:
            raise QueueFull(
                f"too many requests for {name}: {slots} running and "
                f"{pending - slots} waiting (MODEL_RUNNER_MAX_QUEUE={self.limits.max_queue});"
                " retry later",
                retry_after=refusals.RETRY_AFTER_S,
            )

    async def _get(self, key: RunnerKey, name: str, files: Callable[[], ModelFiles]) -> Resident:
        while True:
            if self._closing:
                raise ShuttingDown("the service is shutting down")
            resident = self._residents.get(key)
            if resident is not None and resident.process.alive and not resident.draining:
                return resident
            if resident is not None and not resident.draining:
                log.warning(
                    "runner died; starting it again",
                    model=name,
                    mode=key.mode,
                    how=describe_exit(resident.process.exit_code),
                )
                await self._stop(resident)
            if resident is not None:  # draining: it is kept (requests wait) or stopped
                await resident.idle.wait()
                await asyncio.sleep(0.01)
                continue
            loading = self._loading.get(key)
            if loading is None:
                self._failed_loads.check(key, name)
                plan_ = await self._plan(key, name, files)
                if key in self._residents or key in self._loading:
                    continue  # another request loaded it, or began to, while this one planned
                task = asyncio.create_task(self._load(plan_))
                loading = self._loading[key] = _Loading(plan_, task)
                task.add_done_callback(lambda t: self._loaded(key, t))
            return await asyncio.shield(loading.task)

    def _loaded(self, key: RunnerKey, task: asyncio.Task[Resident]) -> None:
        """Record a runner even when every request waiting for it went away meanwhile."""
        self._loading.pop(key, None)
        if task.cancelled():
            return
        error = task.exception()
        if isinstance(error, LoadFailed):
            self._failed_loads.record(key, error)
            self._observer.load_failed(key)
        if error is None:
            self._failed_loads.forget_runner(key)
            resident = task.result()
            self._residents[key] = resident
            resident.idle.set()
            self._schedule_expiry(resident)
            self._background(self._watch(resident))

    async def _watch(self, resident: Resident) -> None:
        """A runner that dies on its own (a crash, the OOM killer) leaves at once: /engines/ps
        stops listing it and its memory counts as free, before any request finds it dead."""
        await resident.process.wait_exit(None)
        if self._residents.get(resident.key) is resident:
            log.warning(
                "runner died",
                model=resident.name,
                mode=resident.key.mode,
                how=describe_exit(resident.process.exit_code),
            )
            await self._stop(resident)

    def _release(self, resident: Resident) -> None:
        resident.in_use -= 1
        resident.last_used = time.time()
        if resident.in_use > 0:
            return
        resident.idle.set()
        if not resident.draining:
            self._schedule_expiry(resident)

    # -- keep_alive ----------------------------------------------------------------------
    def _schedule_expiry(self, resident: Resident) -> None:
        if resident.in_use or resident.plan.spec.pinned or resident.keep_alive is None:
            return
        resident.expiry = self._call_later(
            resident.keep_alive, lambda: self._background(self._expire(resident))
        )

    def _call_later(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        if self._timer is not None:
            return self._timer(delay, callback)
        # The expiry belongs to no request: an empty context keeps request ids out of its logs.
        return asyncio.get_running_loop().call_later(delay, callback, context=contextvars.Context())

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _expire(self, resident: Resident) -> None:
        if self._residents.get(resident.key) is resident and not resident.in_use:
            if self._wanted[resident.key]:
                return
            log.info("runner idle past its keep_alive; stopping it", model=resident.name)
            self._observer.evicted(resident.key, KEEP_ALIVE)
            await self._stop(resident)

    # -- planning and admission ----------------------------------------------------------
    async def _plan(self, key: RunnerKey, name: str, files: Callable[[], ModelFiles]) -> Plan:
        config = self.configs.effective(key)
        found = await asyncio.to_thread(files)
        gpus = self._gpus = await self._devices()
        spec = plan(key, name, found, config, self.defaults, gpus, self.configs.is_pinned(key))
        try:
            estimate = await asyncio.to_thread(self._estimate, spec, gpus, self._budgets(gpus))
        except memory.EstimateError as exc:
            raise LoadFailed(f"unable to load runner: {exc}") from None
        return Plan(spec, estimate)

    def _budgets(self, gpus: tuple[Device, ...]) -> dict[str, int]:
        return budget.of_devices(self.limits.memory, gpus, self.limits.gpu_memory)

    async def _load(self, plan_: Plan) -> Resident:
        key = plan_.spec.key
        async with self._admission:
            await self._make_room(key, plan_)
            self._loading[key].admitted = True
        return await self._start(plan_)

    async def _make_room(self, key: RunnerKey, plan_: Plan) -> None:
        """Stop or drain other runners until ``plan_`` fits on every device it uses; refuse
        when it never can."""
        need = plan_.estimate.devices()
        limits = self._budgets(self._gpus)  # the devices its plan was estimated for
        too_big = budget.never_fits(need, limits)
        if too_big is not None:
            raise refusals.too_big(plan_, too_big, need[too_big], limits[too_big])
        while True:
            stopping = budget.total(r.plan.estimate for r in self._stopping)
            used = budget.total(
                [r.plan.estimate for r in self._residents.values()]
                + [lo.plan.estimate for k, lo in self._loading.items() if lo.admitted and k != key]
            )
            short = budget.short(need, budget.total([used, stopping]), limits)
            if not short:
                return
            if not budget.short(need, used, limits):  # it fits once those runners have exited
                await asyncio.gather(*(r.stopped.wait() for r in list(self._stopping)))
                continue
            movable = [
                r
                for r in self._residents.values()
                if self._evictable(r) and any(r.plan.estimate.on(d) for d in short)
            ]
            stuck = budget.minus(used, budget.total(r.plan.estimate for r in movable))
            blocked = budget.short(need, stuck, limits)
            if blocked:
                holders = [r for r in self._residents.values() if r not in movable]
                raise refusals.held(plan_, blocked[0], need, stuck, limits, holders)
            victim = min(movable, key=lambda r: (r.in_use > 0, r.last_used))
            if victim.in_use:
                if not await self._drain(victim, plan_):
                    continue  # requests came for it meanwhile: it stays
            else:
                log.info("stopping idle runner for room", model=victim.name, for_model=plan_.name)
            self._observer.evicted(victim.key, FOR_MEMORY)
            await self._stop(victim)

    async def _drain(self, victim: Resident, plan_: Plan) -> bool:
        """Let a busy runner finish its requests, taking no new ones; False if some now wait."""
        victim.draining = True
        log.info(
            "draining runner to make room",
            model=victim.name,
            in_flight=victim.in_use,
            for_model=plan_.name,
        )
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                await victim.idle.wait()
        except TimeoutError:
            raise refusals.still_busy(plan_, victim, DRAIN_TIMEOUT_S) from None
        finally:
            victim.draining = False
        return not self._wanted[victim.key]

    def _evictable(self, resident: Resident) -> bool:
        """Not pinned, and no request waiting for it: a model in demand is not swapped out."""
        if not resident.process.alive:
            return True
        return not (resident.plan.spec.pinned or resident.waiting or self._wanted[resident.key])

    async def _start(self, plan_: Plan) -> Resident:
        started = time.monotonic()
        process = await self._start_process(plan_.spec, plan_.estimate)
        try:
            await process.wait_ready()
        except BaseException:
            await process.stop(SHUTDOWN_STOP_TIMEOUT_S if self._closing else STOP_TIMEOUT_S)
            raise
        seconds = time.monotonic() - started
        self._observer.loaded(plan_.spec.key, seconds)
        log.info(
            "runner ready",
            model=plan_.name,
            mode=plan_.spec.key.mode,
            pid=process.pid,
            seconds=round(seconds, 2),
            memory_estimate_mib=round(plan_.estimate.total / MIB),
        )
        return Resident(plan_, process, keep_alive=plan_.spec.keep_alive)

    # -- control -------------------------------------------------------------------------
    def snapshot(self) -> list[RunnerView]:
        """Runners loading, then runners loaded: what ``/engines/ps`` shows."""
        loading = [
            RunnerView.of(lo.plan.spec, lo.plan.estimate, True) for lo in self._loading.values()
        ]
        return loading + [r.view() for r in self._residents.values()]

    def live(self) -> list[tuple[RunnerView, RunnerProcess]]:
        """Loaded runners still running, with their processes: to ask them for their figures."""
        return [(r.view(), r.process) for r in self._residents.values() if r.process.alive]

    def _detach(self, resident: Resident) -> None:
        """No request can get this runner from now on (it is about to stop)."""
        if self._residents.get(resident.key) is resident:
            del self._residents[resident.key]
        if resident.expiry is not None:
            resident.expiry.cancel()

    async def _stop(self, resident: Resident, timeout: float = STOP_TIMEOUT_S) -> None:
        self._detach(resident)
        self._stopping.add(resident)
        try:
            await resident.process.stop(timeout)
        finally:
            self._stopping.discard(resident)
            resident.stopped.set()
        log.info("runner stopped", model=resident.name, mode=resident.key.mode)
        if self._on_stop is not None:
            self._on_stop(resident.key)

    async def unload(self, model_ids: set[str] | None) -> int:
        """Stop idle runners of these models (all when None); busy ones are left alone."""
        idle = [
            r
            for r in list(self._residents.values())
            if not r.in_use and (model_ids is None or r.key.model_id in model_ids)
        ]
        for resident in idle:  # now, before any await lets a request take one
            self._detach(resident)
        self.configs.clear_overrides(model_ids)
        self._failed_loads.forget_models(model_ids)
        await asyncio.gather(*(self._stop(r) for r in idle))
        return len(idle)

    async def configure(self, key: RunnerKey, config: RunnerConfig) -> bool:
        """Set a model's configuration; False when it is unchanged. Refused while its runner
        serves or loads; an idle runner stops, to start again with it."""
        config = self.configs.over_base(key, config)
        if self.configs.effective(key) == config:
            return False
        resident = self._residents.get(key)
        if key in self._loading or self._wanted[key] or (resident is not None and resident.in_use):
            raise RunnerBusy("runner already active")
        self.configs.override(key, config)
        self._failed_loads.forget_runner(key)  # a new configuration deserves a new try
        if resident is not None:
            await self._stop(resident)
        return True

    async def close(self) -> None:
        """Refuse new loads and stop every runner, at once: called once the HTTP server has
        given the requests in flight their MODEL_RUNNER_SHUTDOWN_TIMEOUT."""
        self._closing = True
        loads = [loading.task for loading in self._loading.values()]
        for task in [*loads, *self._tasks]:
            task.cancel()
        await asyncio.gather(*loads, *self._tasks, return_exceptions=True)
        # Runners that were being stopped (keep_alive, unload) had their tasks cancelled above.
        await asyncio.gather(
            *(
                r.process.stop(SHUTDOWN_STOP_TIMEOUT_S)
                for r in {*self._residents.values(), *self._stopping}
            ),
            return_exceptions=True,
        )
        self._residents.clear()
