"""How a runner will be started: a pure function from a model, its configuration and the
service's defaults to a launch spec. Nothing here reads files or starts anything."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.durations import parse_keep_alive
from app.scheduler.runner_config import RunnerConfig

# Tokens per slot when neither the model's configuration nor the operator says otherwise.
DEFAULT_CTX_SIZE = 4096
COMPLETION, EMBEDDING = "completion", "embedding"


@dataclass(frozen=True, order=True)
class RunnerKey:
    """One runner per model and mode: a model can serve chat and embeddings side by side."""

    model_id: str
    mode: str


@dataclass(frozen=True)
class Defaults:
    """Service-wide settings a model's own configuration may override."""

    parallel: int
    threads: int
    gpu_layers: int | None  # None: every layer when llama.cpp can offload, else none
    keep_alive: float | None  # seconds; None: never unloaded


@dataclass(frozen=True)
class ModelFiles:
    """What a launch needs to know of a stored model."""

    gguf: Path  # the first shard: llama.cpp finds the others from its name
    shards: tuple[Path, ...]
    chat_template: Path | None
    context_size: int | None  # the model's own, from its configuration


@dataclass(frozen=True)
class LaunchSpec:
    key: RunnerKey
    name: str  # as the request spelled it: what responses and logs call the model
    files: ModelFiles
    context_size: int  # tokens per slot asked for; the memory estimate caps it by training
    parallel: int  # slots
    threads: int
    gpu_layers: int | None  # None: all
    keep_alive: float | None
    pinned: bool


def plan(
    key: RunnerKey,
    name: str,
    files: ModelFiles,
    config: RunnerConfig,
    defaults: Defaults,
    pinned: bool = False,
) -> LaunchSpec:
    ctx = config.context_size or min(files.context_size or DEFAULT_CTX_SIZE, DEFAULT_CTX_SIZE)
    # An embedding runner computes one input at a time.
    parallel = (config.parallel or defaults.parallel) if key.mode == COMPLETION else 1
    gpu_layers = config.gpu_layers if config.gpu_layers is not None else defaults.gpu_layers
    keep_alive = (
        parse_keep_alive(config.keep_alive)
        if config.keep_alive is not None
        else defaults.keep_alive
    )
    return LaunchSpec(
        key=key,
        name=name,
        files=files,
        context_size=ctx,
        parallel=parallel,
        threads=config.threads or defaults.threads,
        gpu_layers=gpu_layers,
        keep_alive=keep_alive,
        pinned=pinned,
    )
