"""Fixtures that start real things: the service as a subprocess on a free port and a Unix socket."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from app.client import ClientError, ServiceClient
from tests.netutil import free_port
from tests.registry import LocalRegistry, registry_available
from tests.tiny_gguf import write_tiny_gguf

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Server:
    models_path: Path
    sock: Path
    port: int
    log_path: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "MODELS_PATH": str(self.models_path),
            "MODEL_RUNNER_PORT": str(self.port),
            "MODEL_RUNNER_SOCK": str(self.sock),
            "MODEL_RUNNER_HOST": self.url,
            **self.extra_env,
        }

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def tcp(self) -> ServiceClient:
        return ServiceClient(self.url, timeout=30)

    @property
    def unix(self) -> ServiceClient:
        return ServiceClient(f"unix://{self.sock}", timeout=30)

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child keeps it open)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app", "serve"], cwd=REPO, env=self.env, stdout=log, stderr=log
        )
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited at start-up:\n{self.log()}")
            try:
                # The probe answers without an API key, when the service asks for one.
                if self.tcp.request("GET", "/healthz").status == 200:
                    return
            except ClientError:
                time.sleep(0.05)
        raise RuntimeError(f"service did not start:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=20)

    def discard(self) -> None:
        """After a test: killed if it still runs (the test failed half-way), its socket gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.stop(signal.SIGKILL)
        self.sock.unlink(missing_ok=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_logged(self, text: str, times: int = 1) -> list[str]:
        """The log's lines holding ``text``, once there are ``times`` of them: a runner's stderr
        reaches the log on its own schedule. The bound is for a hang, not a speed."""
        deadline = time.monotonic() + 60
        while len(lines := [ln for ln in self.log().splitlines() if text in ln]) < times:
            assert time.monotonic() < deadline, f"never logged {times}x: {text}"
            time.sleep(0.02)
        return lines

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "app", *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{args} failed ({result.returncode}): {result.stderr}")
        return result


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def openai_error(reply: Any) -> dict[str, Any]:
    """The error object of an answer in OpenAI's shape, after checking that it is one."""
    assert reply.headers["Content-Type"].startswith("application/json"), reply.text
    error = json.loads(reply.body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == ("invalid_request_error" if reply.status < 500 else "server_error")
    return error


def new_server(root: Path, **env: str) -> Server:
    """A service (not started yet) with its store and log under ``root``."""
    return Server(
        models_path=root / "models",
        # AF_UNIX paths are limited to ~107 bytes; pytest's tmp paths can be longer.
        sock=Path(f"/tmp/mr-test-{os.getpid()}-{free_port()}.sock"),
        port=free_port(),
        log_path=root / "service.log",
        extra_env=env,
    )


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = new_server(tmp_path)
    srv.start()
    yield srv
    srv.discard()


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[LocalRegistry]:
    if not registry_available():
        pytest.fail("docker-registry is not installed (apt-get install docker-registry)")
    reg = LocalRegistry(tmp_path / "registry").start()
    yield reg
    reg.stop()
