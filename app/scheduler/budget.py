"""Bytes per device (``{"host": n, "CUDA0": m}``): what runners need, use, and may have.

Admission is the same question on every device: a runner fits when, on each device it uses,
what is used plus what it needs stays within that device's budget.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from app.scheduler.devices import HOST, Device
from app.scheduler.memory import Estimate
from app.sizes import parse_size

Amounts = Mapping[str, int]


def of_devices(host_limit: int, gpus: Iterable[Device], gpu_limit: str) -> dict[str, int]:
    """Each device's budget; ``gpu_limit`` is a size or a share of each GPU's total, as
    MODEL_RUNNER_GPU_MEMORY_LIMIT gives it."""
    return {HOST: host_limit, **{g.name: parse_size(gpu_limit, g.total) for g in gpus}}


def total(parts: Iterable[Estimate | Amounts]) -> dict[str, int]:
    summed: dict[str, int] = {}
    for part in parts:
        amounts = part.devices() if isinstance(part, Estimate) else part
        for device, n in amounts.items():
            summed[device] = summed.get(device, 0) + n
    return summed


def minus(a: Amounts, b: Amounts) -> dict[str, int]:
    return {device: n - b.get(device, 0) for device, n in a.items()}


def short(need: Amounts, used: Amounts, limits: Amounts) -> list[str]:
    """The devices where ``need`` does not fit beside ``used``."""
    return [
        d for d, n in need.items() if n and used.get(d, 0) + n > limits.get(d, used.get(d, 0) + n)
    ]


def never_fits(need: Amounts, limits: Amounts) -> str | None:
    """A device whose whole budget is too small for ``need``."""
    return next((d for d in short(need, {}, limits)), None)


def where(device: str) -> str:
    """How messages name a device: nothing for the host (the case everyone knows)."""
    return "" if device == HOST else f" on {device}"
