"""Runner processes, one per (model, mode), each on its own Unix socket.

Until the scheduler issue adds keep_alive and eviction, every runner started stays up. Starts
of the same runner are shared; a runner that died (llama.cpp abort, OOM kill) is started again
on the next request, and the error its death caused carries the tail of its stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import structlog

from app.logging import get_logger
from app.store import IndexEntry, ModelStore

log = get_logger("runners")

READY_TIMEOUT_S = 300
DEFAULT_CTX_SIZE = 4096
_STDERR_LINES = 20


class RunnerFailed(Exception):
    """A runner could not start, or died; the message includes what it printed."""


@dataclass
class Runner:
    model_id: str
    mode: str
    socket: Path
    proc: asyncio.subprocess.Process
    session: aiohttp.ClientSession
    stderr: deque[str] = field(default_factory=lambda: deque(maxlen=_STDERR_LINES))
    reader: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    def tail(self) -> str:
        return "\n".join(self.stderr)

    async def stop(self) -> None:
        if self.alive:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        await self.session.close()
        if self.reader:
            await asyncio.gather(self.reader, return_exceptions=True)
        self.socket.unlink(missing_ok=True)


class RunnerManager:
    def __init__(self, store: ModelStore, parallel: int, threads: int) -> None:
        self.store = store
        self.parallel = parallel
        self.threads = threads
        self._runners: dict[tuple[str, str], Runner] = {}
        self._starting: dict[tuple[str, str], asyncio.Task[Runner]] = {}
        self._dir = Path(tempfile.mkdtemp(prefix="model-runner-"))
        self._serial = 0

    async def get(self, entry: IndexEntry, mode: str, name: str) -> Runner:
        key = (entry.id, mode)
        runner = self._runners.get(key)
        if runner is not None and runner.alive:
            return runner
        if runner is not None:
            log.warning(
                "runner died; starting it again",
                model=name,
                mode=mode,
                exit_code=runner.proc.returncode,
            )
            del self._runners[key]
            await runner.stop()
        task = self._starting.get(key)
        if task is None:
            task = asyncio.create_task(self._start(entry, mode, name))
            self._starting[key] = task
            task.add_done_callback(lambda t: self._started(key, t))
        return await asyncio.shield(task)

    def _started(self, key: tuple[str, str], task: asyncio.Task[Runner]) -> None:
        """Record a runner even when every request waiting for it went away meanwhile."""
        self._starting.pop(key, None)
        if not task.cancelled() and task.exception() is None:
            self._runners[key] = task.result()

    async def _start(self, entry: IndexEntry, mode: str, name: str) -> Runner:
        bundle = await asyncio.to_thread(self.store.bundle, entry)
        ctx = int(bundle.config.get("context_size") or DEFAULT_CTX_SIZE)
        self._serial += 1  # a fresh socket per start: never mistake a stale one for this runner
        socket = self._dir / f"{entry.hex[:12]}-{mode}-{self._serial}.sock"
        args = [
            sys.executable, "-m", "app.runner",
            "--model", str(bundle.gguf),
            "--name", name,
            "--mode", mode,
            "--socket", str(socket),
            "--ctx-size", str(min(ctx, DEFAULT_CTX_SIZE)),
            "--parallel", str(self.parallel),
            "--threads", str(self.threads),
        ]  # fmt: skip
        if bundle.chat_template is not None:
            args += ["--chat-template", str(bundle.chat_template)]
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            cwd=Path(__file__).resolve().parent.parent.parent,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket)))
        runner = Runner(entry.id, mode, socket, proc, session)
        # An empty context: the runner's lines must not carry the first request's id.
        runner.reader = asyncio.create_task(
            _collect(proc, runner.stderr, log.bind(model=name, mode=mode, pid=proc.pid)),
            context=contextvars.Context(),
        )
        try:
            await self._wait_ready(runner)
        except BaseException:
            await runner.stop()
            raise
        log.info(
            "runner ready",
            model=name,
            mode=mode,
            pid=proc.pid,
            seconds=round(time.monotonic() - started, 2),
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

    async def close(self) -> None:
        for task in list(self._starting.values()):
            task.cancel()
        await asyncio.gather(*(r.stop() for r in self._runners.values()), return_exceptions=True)
        self._runners.clear()
        with contextlib.suppress(OSError):
            os.rmdir(self._dir)


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
