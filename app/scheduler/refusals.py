"""Why a runner cannot be loaded now, in words a user can act on: the sizes, the limit and the
setting that sets it, and what holds the memory."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from app.scheduler.budget import where
from app.scheduler.devices import env_var
from app.scheduler.errors import NoMemory
from app.scheduler.resident import Plan, Resident
from app.sizes import mib

RETRY_AFTER_S = 2


def too_big(plan: Plan, device: str, need: int, limit: int) -> NoMemory:
    """More than the device's whole budget: waiting will not help."""
    est = plan.estimate
    breakdown = (
        f"weights {mib(est.weights)}, KV cache {mib(est.kv_cache)} for "
        f"{plan.spec.parallel}x{est.ctx_per_slot} tokens, compute {mib(est.compute)}"
    )
    return NoMemory(
        f"{plan.name} needs about {mib(need)}{where(device)} ({breakdown}), more than the "
        f"memory limit of {mib(limit)}{where(device)} ({env_var(device)})"
    )


def held(
    plan: Plan,
    device: str,
    need: Mapping[str, int],
    stuck: Mapping[str, int],
    limits: Mapping[str, int],
    holders: Sequence[Resident],
) -> NoMemory:
    """Runners that cannot be stopped now (pinned, or with requests waiting) hold the room."""
    names = ", ".join(
        f"{r.name} {mib(r.plan.estimate.on(device))}"
        + (" pinned" if r.plan.spec.pinned else f" {r.in_use} requests")
        for r in holders
        if r.plan.estimate.on(device)
    )
    return NoMemory(
        f"cannot load {plan.name}: it needs about {mib(need[device])} and "
        f"{mib(stuck.get(device, 0))} of the {mib(limits[device])} memory limit{where(device)} "
        f"is held by runners that cannot be stopped now ({names or 'models loading'}); "
        "retry later",
        retry_after=RETRY_AFTER_S,
    )


def still_busy(plan: Plan, victim: Resident, waited_s: float) -> NoMemory:
    return NoMemory(
        f"cannot load {plan.name}: {victim.name} is still serving requests after "
        f"{waited_s:.0f} s and there is no memory for both; retry later",
        retry_after=RETRY_AFTER_S,
    )
