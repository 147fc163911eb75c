"""Per-model runner settings: what ``_configure`` and the preload manifest may change.

DMR passes ``runtime-flags`` to llama-server; our runner is not llama-server, so the flags it
can honour are mapped onto these fields and every other flag is refused by name rather than
silently ignored.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, fields, replace
from typing import Any

from app.durations import DurationError, format_keep_alive, parse_keep_alive

MODES = ("completion", "embedding")
# Spelling (DMR's llama.cpp allowlist) -> field it sets; None: accepted, nothing to do.
_VALUE_FLAGS = {
    "--ctx-size": "context_size",
    "-c": "context_size",
    "--parallel": "parallel",
    "-np": "parallel",
    "--n-gpu-layers": "gpu_layers",
    "--gpu-layers": "gpu_layers",
    "-ngl": "gpu_layers",
    "--threads": "threads",
    "-t": "threads",
}
_SWITCHES = ("--jinja", "--embeddings", "--metrics", "--cont-batching", "-cb")


AUTO = 0  # context size: the model's own


class ConfigError(ValueError):
    """A configuration the runner cannot honour; the message is for the client."""


@dataclass(frozen=True)
class RunnerConfig:
    # Tokens per slot; None: not set here; AUTO: the model's own (capped at 4096).
    context_size: int | None = None
    parallel: int | None = None  # slots; None: MODEL_RUNNER_PARALLEL
    gpu_layers: int | None = None  # None: MODEL_RUNNER_GPU_LAYERS
    threads: int | None = None  # None: MODEL_RUNNER_THREADS
    keep_alive: str | None = None  # a checked duration text; None: MODEL_RUNNER_KEEP_ALIVE
    runtime_flags: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """DMR's BackendConfiguration, plus our own fields."""
        doc: dict[str, Any] = {}
        if self.context_size is not None:
            doc["context-size"] = -1 if self.context_size == AUTO else self.context_size
        if self.runtime_flags:
            doc["runtime-flags"] = list(self.runtime_flags)
        if self.keep_alive is not None:
            doc["keep_alive"] = format_keep_alive(parse_keep_alive(self.keep_alive))
        if self.parallel is not None:
            doc["parallel"] = self.parallel
        if self.gpu_layers is not None:
            doc["gpu-layers"] = self.gpu_layers
        if self.threads is not None:
            doc["threads"] = self.threads
        return doc


def from_request(doc: dict[str, Any]) -> tuple[str, RunnerConfig]:
    """The mode and config a ``_configure`` body (spec 5.4) asks for."""
    for key, what in (("speculative", "speculative decoding"), ("llamacpp", "llamacpp options")):
        if doc.get(key):
            raise ConfigError(f"{key}: {what} is not supported by this runner")
    flags = _flags(doc)
    config = apply_flags(RunnerConfig(runtime_flags=tuple(flags)), flags)
    mode = doc.get("mode")
    if mode is None or mode == "":
        mode = "embedding" if "--embeddings" in flags else "completion"
    if mode not in MODES:
        raise ConfigError(f"mode {mode!r} is not supported; expected one of {', '.join(MODES)}")
    fields: dict[str, Any] = {}
    if "context-size" in doc and doc["context-size"] is not None:
        fields["context_size"] = positive(doc["context-size"], "context-size", allow_auto=True)
    for key, name in (("parallel", "parallel"), ("gpu-layers", "gpu_layers")):
        if doc.get(key) is not None:
            fields[name] = positive(doc[key], key, allow_zero=name == "gpu_layers")
    if doc.get("keep_alive") is not None:
        fields["keep_alive"] = checked_keep_alive(doc["keep_alive"])
    return mode, replace(config, **fields)


def layered(base: RunnerConfig | None, top: RunnerConfig) -> RunnerConfig:
    """``top`` over ``base``: a _configure that sets only keep_alive keeps the manifest's
    context size."""
    if base is None:
        return top
    changes = {
        f.name: getattr(top, f.name) for f in fields(top) if getattr(top, f.name) not in (None, ())
    }
    return replace(base, **changes)


def checked_keep_alive(value: object) -> str:
    """The value as text, once known to parse (numbers are Ollama's seconds)."""
    try:
        parse_keep_alive(value)
    except DurationError as exc:
        raise ConfigError(str(exc)) from None
    return str(value)


def positive(
    value: object, name: str, allow_zero: bool = False, allow_auto: bool = False
) -> int | None:
    """A whole number of at least 1 (or 0); -1 means "the model's own" (AUTO) where
    ``allow_auto``: set explicitly, so that it overrides a manifest's value."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be a whole number, not {value!r}")
    if allow_auto and value == -1:
        return AUTO
    if value < (0 if allow_zero else 1):
        raise ConfigError(f"{name} must be at least {0 if allow_zero else 1}, not {value}")
    return value


def _flags(doc: dict[str, Any]) -> list[str]:
    flags = doc.get("runtime-flags")
    if flags:
        if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
            raise ConfigError("runtime-flags must be a list of strings")
        return list(flags)
    raw = doc.get("raw-runtime-flags") or ""
    if not isinstance(raw, str):
        raise ConfigError("raw-runtime-flags must be a string")
    try:
        return shlex.split(raw)
    except ValueError as exc:
        raise ConfigError(f"raw-runtime-flags: {exc}") from None


def apply_flags(config: RunnerConfig, flags: list[str]) -> RunnerConfig:
    for token in flags:  # as DMR: no paths, so no flag can make the runner read or write files
        if "/" in token or "\\" in token:
            raise ConfigError(f"runtime flag value {token!r} may not contain a path")
    fields: dict[str, Any] = {}
    i = 0
    while i < len(flags):
        flag, value = flags[i], None
        if "=" in flag:
            flag, value = flag.split("=", 1)
        if flag in _SWITCHES and value is None:
            i += 1
            continue
        name = _VALUE_FLAGS.get(flag)
        if name is None:
            supported = ", ".join([*_VALUE_FLAGS, *_SWITCHES])
            raise ConfigError(
                f'runtime flag "{flag}" is not supported by this runner (supported: {supported})'
            )
        if value is None:
            if i + 1 >= len(flags):
                raise ConfigError(f'runtime flag "{flag}" needs a value')
            value = flags[i + 1]
            i += 1
        i += 1
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(
                f'runtime flag "{flag}" needs a whole number, not {value!r}'
            ) from None
        fields[name] = positive(
            number, flag, allow_zero=name == "gpu_layers", allow_auto=name == "context_size"
        )
    return replace(config, **fields)
