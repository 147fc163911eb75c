"""Service settings, read once from the environment.

Nothing else in the service reads ``os.environ``: everything configurable lives here so that a bad
value stops start-up with one line naming the variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from app import sizes
from app.durations import DurationError, parse_keep_alive

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("json", "console")


class SettingsError(ValueError):
    """A configuration value is unusable; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    port: int = 12434
    # More TCP ports on the same address: the image adds 80, so that DMR's documented
    # http://model-runner.docker.internal/ works unchanged inside a Compose network.
    extra_ports: tuple[int, ...] = ()
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
    # Sequences one runner decodes together (continuous batching slots); None: 4 on a CPU,
    # sized from the GPUs' memory (8 to 64) with a GPU.
    parallel: int | None = None
    # CPU threads per runner; None: every core, or 4 with a GPU.
    threads: int | None = None
    # GPU layers per runner; None: all when llama.cpp was built with offload, else none.
    gpu_layers: int | None = None
    # Idle runners leave after this many seconds; None: never (MODEL_RUNNER_KEEP_ALIVE=-1).
    keep_alive: float | None = 300.0
    # What the runners' estimates may add up to on each GPU: a size, or a share of its memory.
    gpu_memory_limit: str = "90%"
    # Bytes the runners' estimated memory may add up to.
    memory_limit: int = field(
        default_factory=lambda: int(sizes.machine_memory() * sizes.DEFAULT_SHARE)
    )
    # Requests waiting for a runner's slots beyond which new ones get 503 at once.
    max_queue: int = 64
    # Seconds requests in flight get to finish after SIGTERM: with the runners' 1.5 s to exit,
    # under `docker stop`'s 10 s grace.
    shutdown_timeout: float = 6.0
    # The preload manifest (YAML) and/or a comma-separated list of references to preload.
    manifest: Path | None = None
    preload_models: tuple[str, ...] = ()
    # Where the CLI finds the service.
    host: str = "http://localhost:12434"
    # JSON bodies (tags, configure, inference) are small; tar uploads stream and are not capped.
    max_body_bytes: int = 10 * 1024 * 1024
    # Seconds a client gets to send its request's headers (from connecting) and its JSON body;
    # idle keep-alive connections close after it too.
    request_timeout: float = 30.0
    # Client connections open at once; beyond it a new one is closed at once. None: 4096, or
    # what the open-files limit leaves room for.
    max_connections: int | None = None
    # Keys a client must present (MODEL_RUNNER_API_KEY, MODEL_RUNNER_API_KEY_FILE); none: no
    # check. Out of repr, so that a logged Settings never shows them.
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    # DMR's DISABLE_METRICS: no /metrics route.
    disable_metrics: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        sock = _get(env, "MODEL_RUNNER_SOCK")
        return cls(
            port=_port(env, "MODEL_RUNNER_PORT", cls.port),
            extra_ports=_ports(env, "MODEL_RUNNER_EXTRA_PORTS"),
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
            gpu_memory_limit=_gpu_memory_limit(env, "MODEL_RUNNER_GPU_MEMORY_LIMIT"),
            origins=tuple(o.strip() for o in _get(env, "DMR_ORIGINS").split(",") if o.strip()),
            gpu_layers=_gpu_layers(env, "MODEL_RUNNER_GPU_LAYERS"),
            keep_alive=_keep_alive(env, "MODEL_RUNNER_KEEP_ALIVE", cls.keep_alive),
            memory_limit=_memory_limit(env, "MODEL_RUNNER_MEMORY_LIMIT"),
            max_queue=_whole(env, "MODEL_RUNNER_MAX_QUEUE", cls.max_queue),
            shutdown_timeout=_seconds(env, "MODEL_RUNNER_SHUTDOWN_TIMEOUT", cls.shutdown_timeout),
            request_timeout=_seconds(env, "MODEL_RUNNER_REQUEST_TIMEOUT", cls.request_timeout),
            max_connections=_positive(env, "MODEL_RUNNER_MAX_CONNECTIONS", cls.max_connections),
            api_keys=_api_keys(env),
            manifest=_manifest(env, "MODEL_RUNNER_MANIFEST"),
            disable_metrics=_flag(env, "DISABLE_METRICS"),
            preload_models=tuple(
                m.strip() for m in _get(env, "MODEL_RUNNER_MODELS").split(",") if m.strip()
            ),
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


def _ports(env: Mapping[str, str], name: str) -> tuple[int, ...]:
    items = [p.strip() for p in _get(env, name).split(",") if p.strip()]
    return tuple(_port({name: p}, name, 0) for p in items)


def _positive(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    raw = _get(env, name)
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise SettingsError(f"{name}={raw!r}: expected a whole number of at least 1")
    return int(raw)


def _whole(env: Mapping[str, str], name: str, default: int) -> int:
    raw = _get(env, name)
    if not raw:
        return default
    if not raw.isdigit():
        raise SettingsError(f"{name}={raw!r}: expected a whole number (0 or more)")
    return int(raw)


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = _get(env, name).lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise SettingsError(f"{name}={raw!r}: expected 1 or 0 (true or false)")


def _gpu_layers(env: Mapping[str, str], name: str) -> int | None:
    raw = _get(env, name).lower()
    if raw in ("", "auto", "all", "-1"):
        return None
    if not raw.isdigit():
        raise SettingsError(f"{name}={raw!r}: expected a number of layers, or all")
    return int(raw)


def _keep_alive(env: Mapping[str, str], name: str, default: float | None) -> float | None:
    raw = _get(env, name)
    if not raw:
        return default
    try:
        return parse_keep_alive(raw)
    except DurationError:
        raise SettingsError(
            f"{name}={raw!r}: expected a duration such as 30s, 5m or 1h, 0 (unload when idle) "
            "or -1 (never)"
        ) from None


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = _get(env, name)
    if not raw:
        return default
    try:
        seconds = parse_keep_alive(raw)
    except DurationError:
        seconds = None
    if seconds is None:
        raise SettingsError(f"{name}={raw!r}: expected a duration such as 10s or 2m")
    return seconds


def _memory_limit(env: Mapping[str, str], name: str) -> int:
    whole = sizes.machine_memory()
    raw = _get(env, name)
    if not raw:
        return int(whole * sizes.DEFAULT_SHARE)
    try:
        limit = sizes.parse_size(raw, whole)
    except ValueError as exc:
        raise SettingsError(f"{name}={raw!r}: {exc}") from None
    if limit <= 0:
        raise SettingsError(f"{name}={raw!r}: must be more than 0 bytes")
    return limit


def _gpu_memory_limit(env: Mapping[str, str], name: str) -> str:
    raw = _get(env, name) or Settings.gpu_memory_limit
    try:
        # Checked against a made-up 80 GiB device: each GPU's own total applies at run time.
        if sizes.parse_size(raw, 80 * 2**30) <= 0:
            raise ValueError("must be more than 0 bytes")
    except ValueError as exc:
        raise SettingsError(f"{name}={raw!r}: {exc}") from None
    return raw


def _manifest(env: Mapping[str, str], name: str) -> Path | None:
    raw = _get(env, name)
    if not raw:
        return None
    path = Path(raw).expanduser()
    if path.is_dir():
        raise SettingsError(f"{name}={raw!r}: is a directory; name the YAML file in it")
    if not path.exists():  # /dev/null is fine: an empty manifest
        raise SettingsError(f"{name}={raw!r}: no such file")
    return path


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


def _api_keys(env: Mapping[str, str]) -> tuple[str, ...]:
    """Keys from the variable (comma-separated) and the file (one a line, ``#`` comments).
    Errors name the variable, never a key."""
    keys: list[str] = []
    name = "MODEL_RUNNER_API_KEY"
    if raw := _get(env, name):
        keys += _checked_keys(name, raw.split(","))
    file_name = "MODEL_RUNNER_API_KEY_FILE"
    if path := _get(env, file_name):
        try:
            text = Path(path).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = (exc.strerror or "unreadable") if isinstance(exc, OSError) else "not UTF-8"
            raise SettingsError(f"{file_name}={path!r}: cannot read it ({reason})") from None
        lines = [line for line in text.splitlines() if not line.strip().startswith("#")]
        keys += _checked_keys(f"{file_name}={path!r}", lines)
    return tuple(dict.fromkeys(keys))


def _checked_keys(source: str, items: list[str]) -> list[str]:
    keys = [item.strip() for item in items if item.strip()]
    if not keys:
        raise SettingsError(f"{source}: holds no key")
    for key in keys:
        if not all("!" <= c <= "~" for c in key):  # what an HTTP header can carry as one token
            raise SettingsError(f"{source}: a key has spaces or characters other than ASCII")
    return keys


def _docker_config(env: Mapping[str, str], default: Path) -> Path:
    directory = _get(env, "DOCKER_CONFIG")
    return Path(directory).expanduser() / "config.json" if directory else default
