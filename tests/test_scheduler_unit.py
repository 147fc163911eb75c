"""The scheduler's decisions with fake runner processes: which runner is evicted, drained,
refused, kept or expired. Milliseconds each; tests/test_scheduler.py runs the real thing."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from app.durations import KeepAlive
from app.scheduler import memory
from app.scheduler.devices import HOST, Device
from app.scheduler.errors import LoadFailed, NoMemory, QueueFull, RunnerBusy, ShuttingDown
from app.scheduler.launch import (
    COMPLETION,
    EMBEDDING,
    Defaults,
    LaunchSpec,
    ModelFiles,
    RunnerKey,
    plan,
)
from app.scheduler.observer import SchedulerObserver
from app.scheduler.process import describe_exit, last_words
from app.scheduler.runner_config import RunnerConfig
from app.scheduler.scheduler import Limits, Scheduler
from app.sizes import MIB

DEFAULTS = Defaults(parallel=2, threads=2, gpu_layers=None, keep_alive=300.0)
FILES = ModelFiles(Path("/m/model.gguf"), (Path("/m/model.gguf"),), None, None)
# Every fake runner's estimate: the real base cost plus 100 MiB of weights.
RUNNER = memory.RUNNER_BASE_BYTES + 100 * MIB
_pids = itertools.count(1000)


class FakeProcess:
    """What the scheduler sees of a runner (the RunnerProcess interface), without llama.cpp."""

    def __init__(self, spec: LaunchSpec, estimate: memory.Estimate, ready: asyncio.Event) -> None:
        self.spec = spec
        self.estimate = estimate
        self.ctx_per_slot = estimate.ctx_per_slot
        self.pid = next(_pids)
        self._exit_code: int | None = None
        self._exited = asyncio.Event()
        self.load_error: str | None = None
        self._ready = ready

    @property
    def exit_code(self) -> int | None:
        return self._exit_code

    @exit_code.setter
    def exit_code(self, code: int) -> None:  # the test kills it, or it stops
        self._exit_code = code
        self._exited.set()

    @property
    def alive(self) -> bool:
        return self.exit_code is None

    async def wait_ready(self) -> None:
        await self._ready.wait()
        if self.load_error:
            self.exit_code = 1
            raise LoadFailed(f"unable to load runner: {self.load_error}")

    async def stop(self, timeout: float) -> None:
        if self.alive:
            self.exit_code = -15

    async def wait_exit(self, timeout: float | None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._exited.wait(), timeout)

    def post(self, route: str, body: bytes) -> Any:
        raise AssertionError("the scheduler never talks to a runner's routes")

    async def metrics(self, timeout: float) -> str | None:
        raise AssertionError("the scheduler never asks a runner for its figures")

    def tail(self) -> str:
        return ""


@dataclass
class Runners:
    """The process factory: every start is recorded; loads finish when ``ready`` is set."""

    ready: asyncio.Event = field(default_factory=asyncio.Event)
    started: list[FakeProcess] = field(default_factory=list)
    fail_with: str | None = None

    def __post_init__(self) -> None:
        self.ready.set()

    async def __call__(self, spec: LaunchSpec, estimate: memory.Estimate) -> FakeProcess:
        process = FakeProcess(spec, estimate, self.ready)
        process.load_error = self.fail_with
        self.started.append(process)
        return process

    def of(self, model: str) -> list[FakeProcess]:
        return [p for p in self.started if p.spec.name == model]


class Timers:
    """keep_alive timers the test fires itself, instead of waiting for them."""

    def __init__(self) -> None:
        self.pending: list[tuple[float, Callable[[], None], asyncio.TimerHandle]] = []

    def __call__(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        handle = asyncio.get_running_loop().call_later(3600, lambda: None)
        self.pending.append((delay, callback, handle))
        return handle

    def delays(self) -> list[float]:
        return [delay for delay, _, handle in self.pending if not handle.cancelled()]

    async def fire(self) -> None:
        due, self.pending = self.pending, []
        for _, callback, handle in due:
            if not handle.cancelled():
                handle.cancel()
                callback()
        await settle()


def fake_estimate(
    spec: LaunchSpec, gpus: tuple[Device, ...], budgets: Mapping[str, int]
) -> memory.Estimate:
    """100 MiB of weights; with a GPU, the same again on each GPU whose model name says so
    ("a@CUDA0"), the weights staying on the host too (as a partly offloaded model's would)."""
    est = memory.Estimate(spec.context_size, weights=100 * MIB, kv_cache=0, compute=0)
    on = [g.name for g in gpus if spec.name.endswith(f"@{g.name}")]
    if not on:
        return est
    return replace(est, gpu_layers=99, by_device=((HOST, RUNNER), *((g, 100 * MIB) for g in on)))


def make(
    runners: Runners,
    limit: int = 10 * RUNNER,
    max_queue: int = 64,
    timers: Timers | None = None,
    clock: Callable[[], float] = lambda: 0.0,
    gpus: tuple[Device, ...] = (),
    gpu_limit: str = "90%",
    observer: SchedulerObserver | None = None,
    **defaults: Any,
) -> Scheduler:
    async def devices() -> tuple[Device, ...]:
        return gpus

    return Scheduler(
        Defaults(**{**DEFAULTS.__dict__, **defaults}),
        Limits(memory=limit, max_queue=max_queue, gpu_memory=gpu_limit),
        runners,
        estimate=fake_estimate,
        devices=devices,
        timer=timers,
        clock=clock,
        observer=observer,
    )


def key(model: str, mode: str = COMPLETION) -> RunnerKey:
    return RunnerKey(f"sha256:{model}", mode)


def lease(s: Scheduler, model: str, mode: str = COMPLETION) -> Any:
    return s.lease(key(model, mode), model, lambda: FILES)


async def use(s: Scheduler, model: str, mode: str = COMPLETION) -> None:
    async with lease(s, model, mode):
        pass


class Held:
    """Leases held open: requests in flight."""

    def __init__(self) -> None:
        self._stack = contextlib.AsyncExitStack()

    async def hold(self, s: Scheduler, model: str) -> None:
        await self._stack.enter_async_context(lease(s, model))

    async def release(self) -> None:
        await self._stack.aclose()


async def until(check: Callable[[], bool]) -> None:
    """Wait for the scheduler to get somewhere: a load plans in threads (the GGUF is read off
    the event loop), so a fixed number of loop turns is not enough."""
    async with asyncio.timeout(10):
        while not check():
            await asyncio.sleep(0.001)


def draining(s: Scheduler, model: str) -> bool:
    return any(v.draining for v in s.snapshot() if v.name == model)


async def settle() -> None:
    """Let every task that can run, run: the scheduler's work is all on this loop."""
    for _ in range(20):
        await asyncio.sleep(0)


def resident(s: Scheduler) -> set[str]:
    return {v.name for v in s.snapshot() if not v.loading}


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    def sync() -> None:
        asyncio.run(test())

    sync.__name__ = test.__name__
    return sync


# -- launch plans ------------------------------------------------------------------------
def test_plan_defaults_and_overrides():
    spec = plan(key("a"), "a", FILES, RunnerConfig(), DEFAULTS)
    assert (spec.context_size, spec.parallel, spec.threads, spec.keep_alive) == (4096, 2, 2, 300)
    model_ctx = ModelFiles(FILES.gguf, FILES.shards, None, context_size=1024)
    assert plan(key("a"), "a", model_ctx, RunnerConfig(), DEFAULTS).context_size == 1024
    config = RunnerConfig(context_size=512, parallel=8, threads=1, gpu_layers=0, keep_alive="1m")
    spec = plan(key("a"), "a", FILES, config, DEFAULTS, pinned=True)
    assert (spec.context_size, spec.parallel, spec.threads, spec.gpu_layers) == (512, 8, 1, 0)
    assert (spec.keep_alive, spec.pinned) == (60, True)
    # An embedding runner computes one input at a time, whatever the settings say.
    assert plan(key("a", EMBEDDING), "a", FILES, config, DEFAULTS).parallel == 1


# -- residency ---------------------------------------------------------------------------
@run
async def test_concurrent_first_requests_share_one_load():
    runners = Runners()
    runners.ready.clear()
    s = make(runners)
    requests = [asyncio.create_task(use(s, "a")) for _ in range(4)]
    await until(lambda: bool(s.snapshot()))
    await settle()
    assert [v.loading for v in s.snapshot()] == [True]
    runners.ready.set()
    await asyncio.gather(*requests)
    assert len(runners.started) == 1 and resident(s) == {"a"}


@run
async def test_a_dead_runner_is_started_again_on_the_next_request():
    runners = Runners()
    s = make(runners)
    await use(s, "a")
    runners.started[0].exit_code = -11  # SIGSEGV while idle
    await until(lambda: s.snapshot() == [])  # gone from ps at once, not at the next request
    await use(s, "a")
    assert len(runners.started) == 2 and runners.started[1].alive


@run
async def test_a_failed_load_is_the_requests_error_and_leaves_nothing_behind():
    runners = Runners(fail_with="the runner exited with code 1: bad GGUF")
    s = make(runners)
    with pytest.raises(LoadFailed, match="bad GGUF"):
        await use(s, "a")
    assert s.snapshot() == [] and not runners.started[0].alive


@run
async def test_a_runner_that_fails_to_load_twice_is_held_back_for_a_minute():
    runners = Runners(fail_with="the runner was killed by SIGSEGV while loading the model")
    now = [100.0]
    s = make(runners, clock=lambda: now[0])
    for _ in range(2):
        with pytest.raises(LoadFailed):
            await use(s, "a")
    now[0] += 10
    with pytest.raises(LoadFailed) as held_back:
        await use(s, "a")
    assert len(runners.started) == 2  # refused at once: no third start
    assert held_back.value.retry_after == 50
    assert "failed to load 2 times in the last 60 s" in str(held_back.value)
    assert "SIGSEGV" in str(held_back.value)
    now[0] += 51  # the first failure has left the window: one more try
    with pytest.raises(LoadFailed):
        await use(s, "a")
    assert len(runners.started) == 3
    runners.fail_with = None
    await s.configure(key("a"), RunnerConfig(context_size=512))  # a new configuration: try now
    await use(s, "a")
    assert resident(s) == {"a"}


def test_how_a_runner_died_in_one_line():
    assert describe_exit(-11) == "was killed by SIGSEGV"
    assert describe_exit(1) == "exited with code 1"
    crash = (
        "Fatal Python error: Segmentation fault\n\nCurrent thread 0x1 (most recent call first):\n"
        '  File "/app/app/engine/llama.py", line 61 in __init__\n'
        '  File "/app/app/runner/__main__.py", line 54 in main\n'
    )
    assert last_words(crash) == (
        ': Fatal Python error: Segmentation fault (File "/app/app/engine/llama.py", line 61 in '
        "__init__)"
    )
    assert last_words("loading\nfailed to load model: bad magic\n") == (
        ": failed to load model: bad magic"
    )
    assert last_words("") == ""


# -- memory-aware eviction ---------------------------------------------------------------
@run
async def test_least_recently_used_idle_runner_makes_room():
    runners = Runners()
    s = make(runners, limit=2 * RUNNER)
    for model in ("a", "b", "a", "c"):  # b is the least recently used when c comes
        await use(s, model)
    assert resident(s) == {"a", "c"}
    assert not runners.of("b")[0].alive and runners.of("a")[0].alive


@run
async def test_a_model_larger_than_the_limit_is_refused_for_good_with_the_numbers():
    s = make(Runners(), limit=RUNNER - MIB)
    with pytest.raises(NoMemory) as refused:
        await use(s, "a")
    assert refused.value.retry_after is None  # waiting will not help
    message = str(refused.value)
    mib = RUNNER // MIB
    assert f"needs about {mib} MiB" in message and "weights 100 MiB" in message
    assert f"memory limit of {mib - 1} MiB (MODEL_RUNNER_MEMORY_LIMIT)" in message


async def b_drains_a(runners: Runners) -> tuple[Scheduler, Held, asyncio.Task[None]]:
    """Room for one runner; a is serving a request when b is asked for."""
    s = make(runners, limit=RUNNER)
    held = Held()
    await held.hold(s, "a")
    load_b = asyncio.create_task(use(s, "b"))
    await until(lambda: draining(s, "a"))
    return s, held, load_b


@run
async def test_a_busy_runner_is_drained_never_cut():
    runners = Runners()
    s, held, load_b = await b_drains_a(runners)
    assert runners.of("a")[0].alive and not load_b.done()
    await held.release()
    await load_b
    assert resident(s) == {"b"} and not runners.of("a")[0].alive


@run
async def test_a_request_for_a_draining_runner_keeps_it():
    runners = Runners()
    s, held, load_b = await b_drains_a(runners)
    late_a = asyncio.create_task(use(s, "a"))  # no new request gets a draining runner...
    await settle()
    assert not late_a.done()
    await held.release()
    await late_a  # ...but once drained, a model in demand is not swapped out
    with pytest.raises(NoMemory) as refused:
        await load_b
    assert refused.value.retry_after
    assert len(runners.of("a")) == 1 and runners.of("a")[0].alive and not runners.of("b")


@run
async def test_a_runner_with_requests_waiting_is_not_evicted():
    runners = Runners()
    s = make(runners, limit=RUNNER, parallel=1)
    held = Held()
    await held.hold(s, "a")
    await held.hold(s, "a")  # beyond its one slot: waiting in its engine
    assert [v.waiting for v in s.snapshot()] == [1]
    with pytest.raises(NoMemory) as refused:
        await use(s, "b")
    assert refused.value.retry_after and "held by runners" in str(refused.value)
    assert f"a {RUNNER // MIB} MiB 2 requests" in str(refused.value)
    assert runners.of("a")[0].alive
    await held.release()


@run
async def test_a_pinned_runner_is_never_evicted():
    runners = Runners()
    s = make(runners, limit=RUNNER)
    s.configs.set_base(key("a"), RunnerConfig(), pin=True)
    await use(s, "a")
    with pytest.raises(NoMemory, match=f"a {RUNNER // MIB} MiB pinned"):
        await use(s, "b")
    assert resident(s) == {"a"}


# -- queue limit -------------------------------------------------------------------------
@run
async def test_a_full_queue_is_refused_at_once():
    s = make(Runners(), parallel=1, max_queue=1)
    held = Held()
    await held.hold(s, "a")
    await held.hold(s, "a")
    with pytest.raises(QueueFull) as refused:
        await use(s, "a")
    assert refused.value.retry_after
    assert "1 running and 1 waiting (MODEL_RUNNER_MAX_QUEUE=1)" in str(refused.value)
    await held.release()
    await use(s, "a")  # room again


# -- keep_alive --------------------------------------------------------------------------
@run
async def test_an_idle_runner_leaves_after_its_keep_alive():
    runners, timers = Runners(), Timers()
    s = make(runners, timers=timers, keep_alive=30.0)
    await use(s, "a")
    assert timers.delays() == [30.0]
    (view,) = s.snapshot()
    assert view.expires_in(view.last_used or 0) == 30.0
    await timers.fire()
    assert s.snapshot() == [] and not runners.started[0].alive
    await use(s, "a")  # loads again on demand
    assert len(runners.started) == 2


@run
async def test_a_request_cancels_the_pending_expiry():
    runners, timers = Runners(), Timers()
    s = make(runners, timers=timers)
    await use(s, "a")
    held = Held()
    await held.hold(s, "a")
    assert timers.delays() == []  # busy: no expiry
    await timers.fire()
    assert runners.started[0].alive
    await held.release()
    assert timers.delays() == [300.0]


@run
async def test_a_requests_own_keep_alive_holds_until_the_next_request_ends():
    runners, timers = Runners(), Timers()
    s = make(runners, timers=timers, keep_alive=30.0)
    async with s.lease(key("a"), "a", lambda: FILES, KeepAlive(3600.0)):
        pass
    assert timers.delays() == [3600.0]
    (view,) = s.snapshot()
    assert view.keep_alive == 3600.0
    await use(s, "a")  # none of its own: the model's again
    assert timers.delays() == [30.0]
    async with s.lease(key("a"), "a", lambda: FILES, KeepAlive(None)):
        pass
    assert timers.delays() == []  # for ever
    async with s.lease(key("a"), "a", lambda: FILES, KeepAlive(0.0)):
        pass
    await timers.fire()
    assert s.snapshot() == [] and len(runners.started) == 1  # one runner throughout


@run
async def test_keep_alive_never_and_pinned_set_no_timer():
    timers = Timers()
    s = make(Runners(), timers=timers)
    s.configs.set_base(key("a"), RunnerConfig(keep_alive="-1"))
    s.configs.set_base(key("b"), RunnerConfig(), pin=True)
    await use(s, "a")
    await use(s, "b")
    assert timers.delays() == [] and resident(s) == {"a", "b"}


# -- _configure and unload ---------------------------------------------------------------
@run
async def test_configure_restarts_an_idle_runner_and_refuses_a_busy_one():
    runners = Runners()
    s = make(runners)
    await use(s, "a")
    assert await s.configure(key("a"), RunnerConfig(context_size=512))
    assert not runners.started[0].alive and resident(s) == set()
    await use(s, "a")
    assert runners.started[1].ctx_per_slot == 512
    assert not await s.configure(key("a"), RunnerConfig(context_size=512))  # unchanged
    held = Held()
    await held.hold(s, "a")
    with pytest.raises(RunnerBusy, match="runner already active"):
        await s.configure(key("a"), RunnerConfig(context_size=256))
    await held.release()


@run
async def test_configure_layers_over_the_manifest():
    s = make(Runners())
    s.configs.set_base(key("a"), RunnerConfig(context_size=1024), pin=True)
    await s.configure(key("a"), RunnerConfig(keep_alive="1h"))
    assert s.configs.effective(key("a")) == RunnerConfig(context_size=1024, keep_alive="1h")


@run
async def test_unload_spares_busy_runners_and_clears_configure():
    runners = Runners()
    s = make(runners)
    await s.configure(key("a"), RunnerConfig(context_size=512))
    await use(s, "a")
    await use(s, "b")
    held = Held()
    await held.hold(s, "c")
    assert await s.unload({key("a").model_id}) == 1
    assert resident(s) == {"b", "c"}
    assert s.configs.effective(key("a")) == RunnerConfig()
    assert await s.unload(None) == 1
    assert resident(s) == {"c"}
    await held.release()


@run
async def test_close_stops_every_runner_and_refuses_new_requests():
    runners = Runners()
    s = make(runners)
    await use(s, "a")
    await use(s, "b", EMBEDDING)
    await s.close()
    assert not any(p.alive for p in runners.started)
    with pytest.raises(ShuttingDown):
        await use(s, "a")
