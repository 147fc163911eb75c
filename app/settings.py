"""Service settings, read once from the environment.

Nothing else in the service reads ``os.environ``: everything configurable lives here so that a bad
value stops start-up with one line naming the variable.
"""

from __future__ import annotations

import os
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
        )


def _get(env: Mapping[str, str], name: str) -> str:
    return env.get(name, "").strip()


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    raw = _get(env, name)
    if not raw:
        return default
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise SettingsError(f"{name}={raw!r}: expected a TCP port number between 1 and 65535")
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
