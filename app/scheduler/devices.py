"""The devices whose memory the runners share: the host's RAM, and each GPU's."""

from __future__ import annotations

from dataclasses import dataclass

HOST = "host"


@dataclass(frozen=True)
class Device:
    """A GPU as ggml's backend device API describes it."""

    name: str  # "CUDA0"
    description: str  # "NVIDIA H200"
    total: int  # bytes
    free: int  # bytes, when it was asked


def env_var(device: str) -> str:
    """The setting that bounds a device's budget, for messages."""
    return "MODEL_RUNNER_MEMORY_LIMIT" if device == HOST else "MODEL_RUNNER_GPU_MEMORY_LIMIT"
