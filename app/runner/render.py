"""Chat templates rendered in worker processes, bounded in CPU time, memory and output.

A template comes with the model, and Jinja's sandbox keeps it from touching the system but not
from looping for hours (``range(100000)`` inside another) or allocating gigabytes. Rendered in a
thread, it would hold the runner's GIL and could never be stopped; in a process the kernel stops
it. Each render gets a CPU budget (RLIMIT_CPU: SIGXCPU ends the worker), the worker's address
space is capped (a memory bomb is a MemoryError), and the runner kills a worker that overruns a
wall-clock deadline or whose request went away. A worker dies with its runner, even mid-render
(PR_SET_PDEATHSIG), and exits when its stdin closes. The worker is app/runner/render_worker.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from typing import Any

from app.runner import SOURCE_ROOT, render_worker
from app.runner.chat import TemplateError, TemplateFailed
from app.runner.render_worker import HEADER, LENGTH

WALL_S = 30.0  # past the worker's CPU budget: only for one that spins without using CPU time
MAX_WORKERS = 2  # renders at once; more wait for a free worker


class Renderer:
    """The runner's side: a few worker processes, started when needed and kept while healthy."""

    def __init__(self, source: str, bos_token: str, eos_token: str) -> None:
        self._setup = _frame({"source": source, "bos": bos_token, "eos": eos_token})
        self._idle: list[asyncio.subprocess.Process] = []
        self._busy: set[asyncio.subprocess.Process] = set()
        self._slots = asyncio.Semaphore(MAX_WORKERS)

    async def start(self) -> None:
        """Start one worker ahead, so that the first chat request does not wait for it."""
        self._idle.append(await self._spawn())

    async def render(self, request: bytes) -> str:
        """The text for a ``render_request``."""
        async with self._slots:
            while self._idle and self._idle[-1].returncode is not None:
                self._idle.pop()  # ended while idle (killed from outside): start another
            worker = self._idle.pop() if self._idle else await self._spawn()
            self._busy.add(worker)
            try:
                status, payload = await asyncio.wait_for(_exchange(worker, request), WALL_S)
            except asyncio.CancelledError:  # the request went away: its render is not wanted
                await _kill(worker)
                raise
            except TimeoutError:
                await _kill(worker)
                raise TemplateFailed(_why(None)) from None
            except (asyncio.IncompleteReadError, ConnectionError):  # it ended mid-render
                raise TemplateFailed(_why(await _ended(worker))) from None
            finally:
                self._busy.discard(worker)
            self._idle.append(worker)
        if status == render_worker.REJECTED:
            raise TemplateError(payload.decode())
        if status == render_worker.FAILED:
            raise TemplateFailed(payload.decode())
        return payload.decode()

    async def close(self) -> None:
        workers = [*self._idle, *self._busy]
        self._idle.clear()
        await asyncio.gather(*(_kill(w) for w in workers))

    async def _spawn(self) -> asyncio.subprocess.Process:
        # Started from the event loop's thread, the main one: PR_SET_PDEATHSIG fires when the
        # thread that started the worker ends, and that one lasts as long as the runner.
        worker = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "app.runner.render_worker",
            str(os.getpid()),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=SOURCE_ROOT,
        )
        assert worker.stdin is not None
        worker.stdin.write(self._setup)
        return worker


async def _exchange(worker: asyncio.subprocess.Process, request: bytes) -> tuple[int, bytes]:
    assert worker.stdin is not None and worker.stdout is not None
    worker.stdin.write(request)
    await worker.stdin.drain()
    status, size = HEADER.unpack(await worker.stdout.readexactly(HEADER.size))
    return status, await worker.stdout.readexactly(size)


async def _kill(worker: asyncio.subprocess.Process) -> int:
    if worker.returncode is None:
        # Not worker.kill(): that polls first, and a poll that reaps an exiting worker before
        # asyncio's child watcher does makes the watcher log a warning and report status 255.
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGKILL)
    return await worker.wait()


async def _ended(worker: asyncio.subprocess.Process) -> int:
    """The exit status of a worker that closed its end of the pipe: exiting, or else stuck."""
    try:
        return await asyncio.wait_for(worker.wait(), 5)
    except TimeoutError:
        return await _kill(worker)


def _why(code: int | None) -> str:
    """Why a render ended without an answer: past its deadline (None), or its worker's exit."""
    if code is None:
        return f"the chat template took more than {WALL_S:g} s"
    if code == render_worker.CPU_EXIT:
        return f"the chat template ran for more than {render_worker.CPU_S} s of CPU time"
    return f"the chat template's renderer died (exit status {code})"


def render_request(messages: list[dict[str, Any]], tools: list[Any] | None) -> bytes:
    """What a worker is sent to render; made off the event loop with the rest of a request's
    checks (the messages may be megabytes of JSON)."""
    return _frame({"messages": messages, "tools": tools})


def _frame(value: Any) -> bytes:
    data = json.dumps(value).encode()
    return LENGTH.pack(len(data)) + data
