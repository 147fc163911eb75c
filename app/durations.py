"""keep_alive values with Ollama's and DMR's semantics: a duration, ``0`` or a negative number.

``None`` stands for "never unload"; ``0.0`` for "unload as soon as the runner is idle".
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


class DurationError(ValueError):
    pass


@dataclass(frozen=True)
class KeepAlive:
    """A request's own keep_alive (Ollama's): how long its runner stays once idle after it,
    in seconds (None: for ever). It lasts until the next request ends; nothing stores it."""

    seconds: float | None


def parse_keep_alive(value: object) -> float | None:
    """Seconds to keep an idle runner, or None for ever.

    Accepts Go durations ("5m", "1h30m", "-1m"), bare numbers of seconds (Ollama's JSON
    numbers, "300"), "0" and any negative value ("-1": never unload).
    """
    if isinstance(value, bool):
        raise DurationError(f"keep_alive {value!r}: expected a duration such as 5m, 0 or -1")
    if isinstance(value, int | float):
        return _finite(float(value), value)
    if not isinstance(value, str) or not value.strip():
        raise DurationError(f"keep_alive {value!r}: expected a duration such as 5m, 0 or -1")
    text = value.strip()
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        return _finite(number, value)
    sign, body = (-1, text[1:]) if text[:1] == "-" else (1, text.removeprefix("+"))
    parts = _PART.findall(body)
    if not parts or "".join(n + u for n, u in parts) != body:
        raise DurationError(
            f"keep_alive {value!r}: expected a duration such as 30s, 5m or 1h, 0, or -1 (never)"
        )
    seconds = _finite(sum(float(n) * _UNITS[u] for n, u in parts), value)
    return None if sign < 0 and seconds else seconds


def _finite(number: float, value: object) -> float | None:
    if not math.isfinite(number):
        raise DurationError(f"keep_alive {value!r}: expected a finite duration; -1 means never")
    return None if number < 0 else number


def format_keep_alive(seconds: float | None) -> str:
    """Go's time.Duration.String ("5m0s", "1h0m0s", "0s"); "-1" for never, as DMR writes it."""
    if seconds is None:
        return "-1"
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:g}s"
    if hours or minutes:
        text = f"{int(minutes)}m" + text
    if hours:
        text = f"{int(hours)}h" + text
    return text
