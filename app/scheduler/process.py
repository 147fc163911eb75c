"""A runner child process: start it, wait until it serves, forward requests to it, stop it.

The scheduler decides which runners live and talks to them only through ``RunnerProcess``;
``RunnerLauncher`` is its real factory (tests give it a fake one).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

import aiohttp
import structlog

from app.logging import get_logger
from app.runner import SOURCE_ROOT
from app.scheduler.errors import LoadFailed
from app.scheduler.launch import LaunchSpec
from app.scheduler.memory import Estimate

log = get_logger("runners")

READY_TIMEOUT_S = 300
_OUTPUT_LINES = 20


class RunnerProcess(Protocol):
    @property
    def pid(self) -> int: ...

    @property
    def alive(self) -> bool: ...

    @property
    def exit_code(self) -> int | None: ...

    async def wait_ready(self) -> None:
        """Return once it serves; raise LoadFailed (and leave it to be stopped) if it never
        will."""

    async def stop(self, timeout: float) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; idempotent."""

    async def wait_exit(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` seconds (None: for as long as it takes) for it to exit."""

    def post(
        self, route: str, body: bytes
    ) -> contextlib.AbstractAsyncContextManager[aiohttp.ClientResponse]:
        """Send a request to one of its OpenAI routes; aiohttp's errors when it dies."""

    async def metrics(self, timeout: float) -> str | None:
        """Its own figures in Prometheus text; None when it does not answer within ``timeout``
        seconds (stopping, stopped, stuck)."""

    def tail(self) -> str:
        """Its last lines of output: why it died, when it did."""


class RunnerLauncher:
    """Starts runners as ``python -m app.runner``, each on a fresh Unix socket."""

    def __init__(self) -> None:
        _remove_stale_socket_dirs()
        self._dir = Path(tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-"))
        self._serial = 0

    async def __call__(self, spec: LaunchSpec, estimate: Estimate) -> LlamaRunnerProcess:
        # A fresh socket per start: never mistake a stale one for this runner.
        self._serial += 1
        digest = spec.key.model_id.removeprefix("sha256:")[:12]
        socket = self._dir / f"{digest}-{spec.key.mode}-{self._serial}.sock"
        args = [
            sys.executable, "-m", "app.runner",
            "--model", str(spec.files.gguf),
            "--name", spec.name,
            "--mode", spec.key.mode,
            "--socket", str(socket),
            "--ctx-size", str(estimate.ctx_per_slot),
            "--parallel", str(spec.parallel),
            "--threads", str(spec.threads),
            "--gpu-layers", str(_gpu_layers(spec, estimate)),
        ]  # fmt: skip
        if spec.files.chat_template is not None:
            args += ["--chat-template", str(spec.files.chat_template)]
        # stdin is the runner's lifeline (app/runner/lifeline.py): this process holds the pipe's
        # only write end, so the runner sees end-of-file when the service is gone.
        args.append("--exit-with-stdin")
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.PIPE,
            # Both of its outputs reach the log: llama.cpp and GPU drivers write to either.
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=SOURCE_ROOT,
            env=runner_env(),
        )
        return LlamaRunnerProcess(spec, proc, socket)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.rmdir(self._dir)


class LlamaRunnerProcess:
    def __init__(self, spec: LaunchSpec, proc: asyncio.subprocess.Process, socket: Path) -> None:
        self._proc = proc
        self._socket = socket
        self._session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket)))
        self._output: deque[str] = deque(maxlen=_OUTPUT_LINES)
        logger = log.bind(model=spec.name, mode=spec.key.mode, pid=proc.pid)
        # An empty context: the runner's lines must not carry the first request's id.
        self._reader = asyncio.create_task(
            _collect(proc, self._output, logger), context=contextvars.Context()
        )
        self._stopped = False

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return self._proc.returncode is None

    @property
    def exit_code(self) -> int | None:
        return self._proc.returncode

    def tail(self) -> str:
        return "\n".join(self._output)

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if not self.alive:
                await asyncio.gather(self._reader, return_exceptions=True)
                raise LoadFailed(
                    f"unable to load runner: the runner {describe_exit(self.exit_code)} while "
                    f"loading the model{last_words(self.tail())}"
                )
            if self._socket.exists():
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with self._session.get("http://runner/health") as resp:
                        if resp.status == 200:
                            return
            await asyncio.sleep(0.02)
        raise LoadFailed("unable to load runner: the runner took too long to load the model")

    @contextlib.asynccontextmanager
    async def post(self, route: str, body: bytes) -> AsyncIterator[aiohttp.ClientResponse]:
        async with self._session.post(
            f"http://runner/v1/{route}",
            data=body,
            headers={"Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        ) as upstream:
            yield upstream

    async def metrics(self, timeout: float) -> str | None:
        if self._stopped:  # its session is closed
            return None
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            async with self._session.get(
                "http://runner/metrics", timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                if resp.status == 200:
                    return await resp.text()
        return None

    async def wait_exit(self, timeout: float | None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._proc.wait(), timeout)

    async def stop(self, timeout: float) -> None:
        if self.alive:
            self._proc.terminate()
            try:
                await asyncio.wait_for(self._proc.wait(), timeout)
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()
            except asyncio.CancelledError:
                self._proc.kill()  # no time left to wait: never leave it running
                raise
        if self._stopped:
            return
        self._stopped = True
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        await self._session.close()
        await asyncio.gather(self._reader, return_exceptions=True)
        self._socket.unlink(missing_ok=True)


_DIR_PREFIX = "model-runner-"


def _remove_stale_socket_dirs() -> None:
    """A service that was SIGKILLed left its runners' socket folder behind: remove those of
    services that are gone (the folder's name holds its service's pid)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{_DIR_PREFIX}*-*"):
        pid = folder.name.removeprefix(_DIR_PREFIX).split("-", 1)[0]
        if not pid.isdigit() or Path(f"/proc/{pid}").exists() or not folder.is_dir():
            continue
        if all(f.suffix == ".sock" for f in folder.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)


def _gpu_layers(spec: LaunchSpec, estimate: Estimate) -> int:
    """The estimate placed the layers when it knew of GPUs; else the runner decides (-1: all
    when its llama.cpp can offload)."""
    if estimate.by_device:
        return estimate.gpu_layers
    return -1 if spec.gpu_layers is None else spec.gpu_layers


def describe_exit(code: int | None) -> str:
    """How a process ended, as people say it: "was killed by SIGSEGV", "exited with code 1"."""
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def last_words(tail: str) -> str:
    """Why a runner died, from what it printed last, as the end of a one-line message: a
    crash's Python error with its innermost frame (faulthandler's report), else its last line."""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    if not lines:
        return ""
    fatal = next((i for i, line in enumerate(lines) if line.startswith("Fatal Python error")), None)
    if fatal is None:
        return f": {lines[-1]}"
    frame = next((line for line in lines[fatal:] if line.startswith("File ")), None)
    return f": {lines[fatal]}" + (f" ({frame})" if frame else "")


# A runner has no use for the API keys: kept out of its environment (and so out of any dump
# or /proc read of it).
_SECRETS = ("MODEL_RUNNER_API_KEY", "MODEL_RUNNER_API_KEY_FILE")


def runner_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SECRETS}
    env["PYTHONUNBUFFERED"] = "1"
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
    assert proc.stdout is not None
    async for raw in proc.stdout:
        text = raw.decode("utf-8", "replace").rstrip()
        if text:
            lines.append(text)
            logger.info("runner says", line=text)
