"""Which runners live: one process per (model, mode), loaded on demand, kept while useful.

- Loads of the same runner are shared; requests to a loaded runner go straight to it and its
  engine queues what exceeds its slots, up to ``max_queue`` waiting requests (then 503).
- Before a load, the runner's memory is estimated from its GGUF; the sum over resident runners
  stays under ``memory_limit``. Room is made by stopping idle runners, least recently used
  first, then by draining busy ones (no new requests, in-flight ones finish) - but never one
  that has requests waiting, nor a pinned one. What cannot fit gets 503 with the numbers.
- Idle runners leave after their keep_alive (0: at once, None: never).
- A runner that died (llama.cpp abort, OOM kill) is started again on the next request; the
  error its death caused carries the tail of its stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from app import errors
from app.logging import get_logger
from app.runner import SOURCE_ROOT
from app.scheduler import memory
from app.scheduler.config import RunnerConfig, layered
from app.scheduler.durations import parse_keep_alive
from app.store import IndexEntry, ModelStore

log = get_logger("runners")

READY_TIMEOUT_S = 300
DEFAULT_CTX_SIZE = 4096
STOP_TIMEOUT_S = 10
# At shutdown the requests have had their time already (the HTTP server drained them).
SHUTDOWN_STOP_TIMEOUT_S = 1.5
# How long a load waits for a busy runner to finish its requests before giving up with 503.
DRAIN_TIMEOUT_S = 60
RETRY_AFTER_S = 2
_STDERR_LINES = 20

Key = tuple[str, str]  # (model ID, mode)


class RunnerFailed(Exception):
    """A runner could not start, or died; the message includes what it printed."""


@dataclass(frozen=True)
class Defaults:
    """Service-wide settings a model's own configuration may override."""

    parallel: int
    threads: int
    gpu_layers: int | None  # None: every layer when llama.cpp can offload, else none
    keep_alive: float | None
    memory_limit: int
    max_queue: int


@dataclass(frozen=True)
class Plan:
    """How a runner will be started, decided before it is."""

    name: str
    args: list[str]
    estimate: memory.Estimate
    parallel: int
    keep_alive: float | None
    pinned: bool


@dataclass(eq=False)  # identity: runners live in sets
class Runner:
    key: Key
    plan: Plan
    socket: Path
    proc: asyncio.subprocess.Process
    session: aiohttp.ClientSession
    stderr: deque[str] = field(default_factory=lambda: deque(maxlen=_STDERR_LINES))
    reader: asyncio.Task[None] | None = None
    in_use: int = 0
    last_used: float = field(default_factory=time.time)
    draining: bool = False
    expiry: asyncio.TimerHandle | None = None
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    @property
    def waiting(self) -> int:
        """Requests beyond the runner's slots: queued in its engine."""
        return max(0, self.in_use - self.plan.parallel)

    def tail(self) -> str:
        return "\n".join(self.stderr)

    async def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        if self.expiry is not None:
            self.expiry.cancel()
        if self.alive:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
            except asyncio.CancelledError:
                self.proc.kill()  # no time left to wait: never leave it running
                raise
        await self.session.close()
        if self.reader:
            await asyncio.gather(self.reader, return_exceptions=True)
        self.socket.unlink(missing_ok=True)
        self.stopped.set()


@dataclass
class Loading:
    plan: Plan
    task: asyncio.Task[Runner]
    admitted: bool = False  # its memory is counted from then on


class RunnerManager:
    def __init__(self, store: ModelStore, defaults: Defaults) -> None:
        self.store = store
        self.defaults = defaults
        self.runners: dict[Key, Runner] = {}
        self.loading: dict[Key, Loading] = {}
        # Manifest entries are the base; _configure overrides them until an unload.
        self.base_configs: dict[Key, RunnerConfig] = {}
        self.configs: dict[Key, RunnerConfig] = {}
        self.pinned: set[Key] = set()  # (model ID, mode): never stopped on their own
        self._wanted: Counter[Key] = Counter()  # requests waiting for a runner to load
        self._stopping: set[Runner] = set()  # still holding their memory until they exit
        self._admission = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._dir = Path(tempfile.mkdtemp(prefix="model-runner-"))
        self._serial = 0

    # -- requests ------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def use(self, entry: IndexEntry, mode: str, name: str) -> AsyncIterator[Runner]:
        """The runner for a request, counted as in use until the request is done."""
        key = (entry.id, mode)
        self._check_queue(key, name)
        self._wanted[key] += 1
        try:
            runner = await self._get(entry, mode, name)
        except RunnerFailed as exc:
            raise errors.ServiceError(f"unable to load runner: {exc}") from None
        finally:
            self._wanted[key] -= 1
        runner.in_use += 1
        runner.idle.clear()
        if runner.expiry is not None:
            runner.expiry.cancel()
            runner.expiry = None
        try:
            yield runner
        finally:
            await self._release(runner)

    def _check_queue(self, key: Key, name: str) -> None:
        runner = self.runners.get(key)
        loading = self.loading.get(key)
        plan = runner.plan if runner else loading.plan if loading else None
        slots = plan.parallel if plan else self.defaults.parallel
        pending = (runner.in_use if runner else 0) + self._wanted[key]
        if pending >= slots + self.defaults.max_queue:
            raise errors.Unavailable(
                f"too many requests for {name}: {slots} running and "
                f"{pending - slots} waiting (MODEL_RUNNER_MAX_QUEUE={self.defaults.max_queue});"
                " retry later",
                retry_after=RETRY_AFTER_S,
            )

    async def _get(self, entry: IndexEntry, mode: str, name: str) -> Runner:
        key = (entry.id, mode)
        while True:
            if self._closing:
                raise errors.Unavailable("the service is shutting down")
            runner = self.runners.get(key)
            if runner is not None and runner.alive and not runner.draining:
                return runner
            if runner is not None and not runner.draining:
                log.warning(
                    "runner died; starting it again",
                    model=name,
                    mode=mode,
                    exit_code=runner.proc.returncode,
                )
                await self._stop(runner)
            if runner is not None:  # draining: it is kept (requests wait) or stopped and reloaded
                await runner.idle.wait()
                await asyncio.sleep(0.01)
                continue
            loading = self.loading.get(key)
            if loading is None:
                plan = await self._plan(entry, mode, name)
                if key in self.runners or key in self.loading:
                    continue  # another request loaded it, or began to, while this one planned
                task = asyncio.create_task(self._load(key, plan))
                loading = self.loading[key] = Loading(plan, task)
                task.add_done_callback(lambda t: self._loaded(key, t))
            return await asyncio.shield(loading.task)

    def _loaded(self, key: Key, task: asyncio.Task[Runner]) -> None:
        """Record a runner even when every request waiting for it went away meanwhile."""
        self.loading.pop(key, None)
        if not task.cancelled() and task.exception() is None:
            runner = task.result()
            self.runners[key] = runner
            runner.idle.set()
            self._schedule_expiry(runner)

    async def _release(self, runner: Runner) -> None:
        runner.in_use -= 1
        runner.last_used = time.time()
        if runner.in_use > 0:
            return
        runner.idle.set()
        if not runner.draining:
            self._schedule_expiry(runner)

    def _schedule_expiry(self, runner: Runner) -> None:
        if runner.in_use or runner.plan.pinned or runner.plan.keep_alive is None:
            return
        loop = asyncio.get_running_loop()
        runner.expiry = loop.call_later(
            runner.plan.keep_alive,
            lambda: self._background(self._expire(runner)),
            context=contextvars.Context(),  # the expiry belongs to no request
        )

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _expire(self, runner: Runner) -> None:
        if self.runners.get(runner.key) is runner and not runner.in_use:
            if self._wanted[runner.key]:
                return
            log.info("runner idle past its keep_alive; stopping it", model=runner.name)
            await self._stop(runner)

    # -- planning and admission ----------------------------------------------------------
    def config_for(self, key: Key) -> RunnerConfig:
        return self.configs.get(key) or self.base_configs.get(key) or RunnerConfig()

    async def _plan(self, entry: IndexEntry, mode: str, name: str) -> Plan:
        config = self.config_for((entry.id, mode))
        bundle = await asyncio.to_thread(self.store.bundle, entry)
        ctx = config.context_size or min(
            int(bundle.config.get("context_size") or DEFAULT_CTX_SIZE), DEFAULT_CTX_SIZE
        )
        # An embedding runner computes one input at a time.
        parallel = (config.parallel or self.defaults.parallel) if mode == "completion" else 1
        try:
            est = await asyncio.to_thread(memory.estimate, bundle.shards, ctx, parallel)
        except memory.EstimateError as exc:
            raise RunnerFailed(str(exc)) from None
        gpu_layers = config.gpu_layers
        if gpu_layers is None:
            gpu_layers = self.defaults.gpu_layers
        self._serial += 1  # a fresh socket per start: never mistake a stale one for this runner
        socket = self._dir / f"{entry.hex[:12]}-{mode}-{self._serial}.sock"
        args = [
            sys.executable, "-m", "app.runner",
            "--model", str(bundle.gguf),
            "--name", name,
            "--mode", mode,
            "--socket", str(socket),
            "--ctx-size", str(est.ctx_per_slot),
            "--parallel", str(parallel),
            "--threads", str(config.threads or self.defaults.threads),
            "--gpu-layers", str(-1 if gpu_layers is None else gpu_layers),
        ]  # fmt: skip
        if bundle.chat_template is not None:
            args += ["--chat-template", str(bundle.chat_template)]
        keep_alive = (
            parse_keep_alive(config.keep_alive)
            if config.keep_alive is not None
            else self.defaults.keep_alive
        )
        return Plan(name, args, est, parallel, keep_alive, (entry.id, mode) in self.pinned)

    async def _make_room(self, key: Key, plan: Plan) -> None:
        """Stop or drain other runners until ``plan`` fits; 503 when it never can."""
        need, limit = plan.estimate.total, self.defaults.memory_limit
        if need > limit:
            raise errors.Unavailable(
                f"{plan.name} needs about {memory.mib(need)} ({self._breakdown(plan)}), more "
                f"than the memory limit of {memory.mib(limit)} (MODEL_RUNNER_MEMORY_LIMIT)"
            )
        while True:
            others = sum(
                lo.plan.estimate.total for k, lo in self.loading.items() if lo.admitted and k != key
            )
            stopping = sum(r.plan.estimate.total for r in self._stopping)
            used = others + stopping + sum(r.plan.estimate.total for r in self.runners.values())
            if used + need <= limit:
                return
            if used - stopping + need <= limit:  # it fits once those runners have exited
                await asyncio.gather(*(r.stopped.wait() for r in list(self._stopping)))
                continue
            movable = [r for r in self.runners.values() if self._evictable(r)]
            stuck = used - stopping - sum(r.plan.estimate.total for r in movable)
            if stuck + need > limit:
                held = ", ".join(
                    f"{r.name} {memory.mib(r.plan.estimate.total)}"
                    + (" pinned" if r.plan.pinned else f" {r.in_use} requests")
                    for r in self.runners.values()
                    if r not in movable
                )
                raise errors.Unavailable(
                    f"cannot load {plan.name}: it needs about {memory.mib(need)} and "
                    f"{memory.mib(stuck)} of the {memory.mib(limit)} memory limit is held by "
                    f"runners that cannot be stopped now ({held or 'models loading'}); "
                    "retry later",
                    retry_after=RETRY_AFTER_S,
                )
            victim = min(movable, key=lambda r: (r.in_use > 0, r.last_used))
            if victim.in_use:
                if not await self._drain(victim, plan):
                    continue  # requests came for it meanwhile: it stays
            else:
                log.info("stopping idle runner for room", model=victim.name, for_model=plan.name)
            await self._stop(victim)

    async def _drain(self, victim: Runner, plan: Plan) -> bool:
        """Let a busy runner finish its requests, taking no new ones; False if some now wait."""
        victim.draining = True
        log.info(
            "draining runner to make room",
            model=victim.name,
            in_flight=victim.in_use,
            for_model=plan.name,
        )
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                await victim.idle.wait()
        except TimeoutError:
            raise errors.Unavailable(
                f"cannot load {plan.name}: {victim.name} is still serving requests after "
                f"{DRAIN_TIMEOUT_S} s and there is no memory for both; retry later",
                retry_after=RETRY_AFTER_S,
            ) from None
        finally:
            victim.draining = False
        return not self._wanted[victim.key]

    def _evictable(self, runner: Runner) -> bool:
        """Not pinned, and no request waiting for it: a model in demand is not swapped out."""
        if not runner.alive:
            return True
        return not (runner.plan.pinned or runner.waiting or self._wanted[runner.key])

    @staticmethod
    def _breakdown(plan: Plan) -> str:
        est = plan.estimate
        return (
            f"weights {memory.mib(est.weights)}, KV cache {memory.mib(est.kv_cache)} for "
            f"{plan.parallel}x{est.ctx_per_slot} tokens, compute {memory.mib(est.compute)}"
        )

    async def _load(self, key: Key, plan: Plan) -> Runner:
        async with self._admission:
            await self._make_room(key, plan)
            self.loading[key].admitted = True
        return await self._start(key, plan)

    async def _start(self, key: Key, plan: Plan) -> Runner:
        socket = Path(plan.args[plan.args.index("--socket") + 1])
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *plan.args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            cwd=SOURCE_ROOT,
            env=_runner_env(),
        )
        session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket)))
        runner = Runner(key, plan, socket, proc, session)
        mode = key[1]
        # An empty context: the runner's lines must not carry the first request's id.
        runner.reader = asyncio.create_task(
            _collect(proc, runner.stderr, log.bind(model=plan.name, mode=mode, pid=proc.pid)),
            context=contextvars.Context(),
        )
        try:
            await self._wait_ready(runner)
        except BaseException:
            await runner.stop(SHUTDOWN_STOP_TIMEOUT_S if self._closing else STOP_TIMEOUT_S)
            raise
        log.info(
            "runner ready",
            model=plan.name,
            mode=mode,
            pid=proc.pid,
            seconds=round(time.monotonic() - started, 2),
            memory_estimate_mib=round(plan.estimate.total / memory.MIB),
        )
        return runner

    async def _wait_ready(self, runner: Runner) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if not runner.alive:
                await asyncio.gather(runner.reader or asyncio.sleep(0), return_exceptions=True)
                raise RunnerFailed(
                    f"the runner exited with code {runner.proc.returncode}: {runner.tail()}"
                )
            if runner.socket.exists():
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with runner.session.get("http://runner/health") as resp:
                        if resp.status == 200:
                            return
            await asyncio.sleep(0.02)
        raise RunnerFailed("the runner took too long to load the model")

    # -- control -------------------------------------------------------------------------
    def _detach(self, runner: Runner) -> None:
        """No request can get this runner from now on (it is about to stop)."""
        if self.runners.get(runner.key) is runner:
            del self.runners[runner.key]
        if runner.expiry is not None:
            runner.expiry.cancel()

    async def _stop(self, runner: Runner) -> None:
        self._detach(runner)
        self._stopping.add(runner)
        try:
            await runner.stop()
        finally:
            self._stopping.discard(runner)
        log.info("runner stopped", model=runner.name, mode=runner.key[1])

    async def unload(self, model_ids: set[str] | None) -> int:
        """Stop idle runners of these models (all when None); busy ones are left alone."""
        idle = [
            r
            for r in list(self.runners.values())
            if not r.in_use and (model_ids is None or r.key[0] in model_ids)
        ]
        for runner in idle:  # now, before any await lets a request take one
            self._detach(runner)
        for key in [k for k in self.configs if model_ids is None or k[0] in model_ids]:
            del self.configs[key]
        await asyncio.gather(*(self._stop(r) for r in idle))
        return len(idle)

    async def configure(self, key: Key, config: RunnerConfig) -> bool:
        """Store a model's config; False when it is unchanged. 409 while its runner is busy."""
        config = layered(self.base_configs.get(key), config)
        if self.config_for(key) == config:
            return False
        runner = self.runners.get(key)
        if key in self.loading or self._wanted[key] or (runner is not None and runner.in_use):
            raise errors.Conflict("runner already active")
        self.configs[key] = config
        if runner is not None:
            await self._stop(runner)
        return True

    async def close(self) -> None:
        """Refuse new loads and stop every runner, at once: called once the HTTP server has
        given the requests in flight their MODEL_RUNNER_SHUTDOWN_TIMEOUT."""
        self._closing = True
        loads = [loading.task for loading in self.loading.values()]
        for task in [*loads, *self._tasks]:
            task.cancel()
        await asyncio.gather(*loads, *self._tasks, return_exceptions=True)
        # Runners that were being stopped (keep_alive, unload) had their tasks cancelled above.
        await asyncio.gather(
            *(r.stop(SHUTDOWN_STOP_TIMEOUT_S) for r in {*self.runners.values(), *self._stopping}),
            return_exceptions=True,
        )
        self.runners.clear()
        with contextlib.suppress(OSError):
            os.rmdir(self._dir)


def _runner_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # llama.cpp's OpenMP threads spin ~300k times at each barrier before sleeping. With two
    # busy runners on the same cores the spinners starve each other: measured on 2 cores,
    # gemma beside a tiny model took 9.7-18 s for 200 tokens instead of 6.0 s with 1000 spins,
    # and one runner alone ran as fast (4.7 s) either way. The operator's own value wins.
    if "OMP_WAIT_POLICY" not in env:  # an explicit spin count would override the policy
        env.setdefault("GOMP_SPINCOUNT", "1000")
    return env


async def _collect(
    proc: asyncio.subprocess.Process,
    lines: deque[str],
    logger: structlog.typing.FilteringBoundLogger,
) -> None:
    assert proc.stderr is not None
    async for raw in proc.stderr:
        text = raw.decode("utf-8", "replace").rstrip()
        if text:
            lines.append(text)
            logger.info("runner says", line=text)
