"""How a runner will be started: a pure function from a model, its configuration and the
service's defaults to a launch spec. Nothing here reads files or starts anything."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from app.durations import parse_keep_alive
from app.scheduler.devices import Device
from app.scheduler.runner_config import RunnerConfig

# Tokens per slot when neither the model's configuration nor the operator says otherwise.
DEFAULT_CTX_SIZE = 4096
COMPLETION, EMBEDDING = "completion", "embedding"


@dataclass(frozen=True, order=True)
class RunnerKey:
    """One runner per model and mode: a model can serve chat and embeddings side by side."""

    model_id: str
    mode: str


# Slots per runner when MODEL_RUNNER_PARALLEL is not set: a CPU decodes few sequences at a
# time to good effect; a GPU many, limited by the KV cache its memory holds (8 per 16 GiB).
CPU_SLOTS = 4
GPU_SLOTS_MIN, GPU_SLOTS_MAX = 8, 64
GPU_SLOTS_PER_GIB = 0.5
# CPU threads when MODEL_RUNNER_THREADS is not set and there is a GPU: the GPU does the work;
# more threads only spin at llama.cpp's barriers.
GPU_THREADS = 4


@dataclass(frozen=True)
class Defaults:
    """Service-wide settings a model's own configuration may override."""

    parallel: int | None  # None: CPU_SLOTS, or sized from the GPUs' memory
    threads: int | None  # None: every core, or GPU_THREADS with a GPU
    gpu_layers: int | None  # None: as many layers as fit on the GPUs (all, when it fits)
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
    gpus: tuple[Device, ...] = (),
    pinned: bool = False,
) -> LaunchSpec:
    ctx = config.context_size or min(files.context_size or DEFAULT_CTX_SIZE, DEFAULT_CTX_SIZE)
    # An embedding runner computes one input at a time.
    parallel = (
        (config.parallel or defaults.parallel or default_slots(gpus))
        if key.mode == COMPLETION
        else 1
    )
    threads = config.threads or defaults.threads or default_threads(gpus)
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
        threads=threads,
        gpu_layers=gpu_layers,
        keep_alive=keep_alive,
        pinned=pinned,
    )


def default_slots(gpus: tuple[Device, ...]) -> int:
    if not gpus:
        return CPU_SLOTS
    gib = sum(g.total for g in gpus) / 2**30
    return max(GPU_SLOTS_MIN, min(GPU_SLOTS_MAX, int(gib * GPU_SLOTS_PER_GIB)))


def default_threads(gpus: tuple[Device, ...]) -> int:
    cores = os.cpu_count() or 2
    return min(GPU_THREADS, cores) if gpus else cores
