"""Service settings, read once from the environment.

Nothing else in the service reads ``os.environ``: everything configurable lives here so that a bad
value stops start-up with one line naming the variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("json", "console")


class SettingsError(ValueError):
    """A configuration value is unusable; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    port: int = 12434
    addr: str = "127.0.0.1"
    sock: Path | None = None
    models_path: Path = Path.home() / ".docker" / "models"
    log_level: str = "info"
    log_format: str = "console"
    # Registry for references that name none; DMR's DEFAULT_REGISTRY.
    default_registry: str = "docker.io"
    # Registries spoken to over plain HTTP ("*" for all), from INSECURE_REGISTRY.
    insecure_registries: tuple[str, ...] = ()
    # Docker's client config, for registry credentials (DOCKER_CONFIG is its directory).
    docker_config: Path = Path.home() / ".docker" / "config.json"
    # Extra browser origins allowed to call the API (DMR_ORIGINS), beside localhost's.
    origins: tuple[str, ...] = ()
    # Sequences one runner decodes together (continuous batching slots).
    parallel: int = 4
    # CPU threads per runner.
    threads: int = os.cpu_count() or 2
    # Where the CLI finds the service.
    host: str = "http://localhost:12434"
    # JSON bodies (tags, configure, inference) are small; tar uploads stream and are not capped.
    max_body_bytes: int = 10 * 1024 * 1024

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        sock = _get(env, "MODEL_RUNNER_SOCK")
        return cls(
            port=_port(env, "MODEL_RUNNER_PORT", cls.port),
            addr=_get(env, "MODEL_RUNNER_ADDR") or cls.addr,
            sock=Path(sock).expanduser() if sock else None,
            models_path=_path(env, "MODELS_PATH", cls.models_path),
            log_level=_choice(env, "LOG_LEVEL", LOG_LEVELS, cls.log_level),
            log_format=_choice(env, "LOG_FORMAT", LOG_FORMATS, cls.log_format),
            default_registry=_registry(env, "DEFAULT_REGISTRY", cls.default_registry),
            insecure_registries=_insecure(env, "INSECURE_REGISTRY"),
            docker_config=_docker_config(env, cls.docker_config),
            host=_get(env, "MODEL_RUNNER_HOST") or cls.host,
            parallel=_positive(env, "MODEL_RUNNER_PARALLEL", cls.parallel),
            threads=_positive(env, "MODEL_RUNNER_THREADS", cls.threads),
            origins=tuple(o.strip() for o in _get(env, "DMR_ORIGINS").split(",") if o.strip()),
        )

    def is_insecure(self, registry: str) -> bool:
        """Plain HTTP for listed registries and, as Docker does, for loopback ones."""
        host = registry.rsplit(":", 1)[0] if registry.count(":") == 1 else registry
        loopback = host in ("localhost", "::1", "[::1]") or host.startswith("127.")
        return loopback or "*" in self.insecure_registries or registry in self.insecure_registries


def _get(env: Mapping[str, str], name: str) -> str:
    return env.get(name, "").strip()


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    raw = _get(env, name)
    if not raw:
        return default
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise SettingsError(f"{name}={raw!r}: expected a TCP port number between 1 and 65535")
    return int(raw)


def _positive(env: Mapping[str, str], name: str, default: int) -> int:
    raw = _get(env, name)
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise SettingsError(f"{name}={raw!r}: expected a whole number of at least 1")
    return int(raw)


def _path(env: Mapping[str, str], name: str, default: Path) -> Path:
    raw = _get(env, name)
    if not raw:
        return default
    if "\x00" in raw:
        raise SettingsError(f"{name}: the path contains a NUL byte")
    path = Path(raw).expanduser()
    if path.exists() and not path.is_dir():
        raise SettingsError(f"{name}={raw!r}: exists and is not a directory")
    return path


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    raw = _get(env, name).lower()
    if not raw:
        return default
    if raw == "warn":
        raw = "warning"
    if raw not in choices:
        raise SettingsError(f"{name}={raw!r}: expected one of {', '.join(choices)}")
    return raw


_HOST = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$")
_DOCKER_HUB_ALIASES = ("index.docker.io", "registry-1.docker.io")


def _registry(env: Mapping[str, str], name: str, default: str) -> str:
    raw = _get(env, name).lower()
    if not raw:
        return default
    raw = raw.removeprefix("https://").removeprefix("http://").rstrip("/")
    if not _HOST.match(raw):
        raise SettingsError(
            f"{name}={raw!r}: expected a registry host such as registry.example.com"
        )
    return "docker.io" if raw in _DOCKER_HUB_ALIASES else raw


def _insecure(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    raw = _get(env, name).lower()
    if raw in ("", "false", "0"):
        return ()
    if raw in ("true", "1", "*"):
        return ("*",)
    hosts = tuple(h.strip() for h in raw.split(",") if h.strip())
    for host in hosts:
        if not _HOST.match(host):
            raise SettingsError(f"{name}: {host!r} is not a registry host[:port]")
    return hosts


def _docker_config(env: Mapping[str, str], default: Path) -> Path:
    directory = _get(env, "DOCKER_CONFIG")
    return Path(directory).expanduser() / "config.json" if directory else default
