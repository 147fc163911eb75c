"""The scheduler's records: a runner's plan, and a runner that was started from one."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from app.scheduler import memory
from app.scheduler.launch import LaunchSpec, RunnerKey
from app.scheduler.process import RunnerProcess
from app.scheduler.snapshot import RunnerView


@dataclass(frozen=True)
class Plan:
    """A launch spec and what it will cost, decided before the runner starts."""

    spec: LaunchSpec
    estimate: memory.Estimate

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(eq=False)  # identity: residents live in sets
class Resident:
    """The scheduler's record of one runner process."""

    plan: Plan
    process: RunnerProcess
    # The spec's, or the last finished request's own (KeepAlive): what the expiry counts.
    keep_alive: float | None = None
    in_use: int = 0
    last_used: float = field(default_factory=time.time)
    draining: bool = False
    expiry: asyncio.TimerHandle | None = None
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def key(self) -> RunnerKey:
        return self.plan.spec.key

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def waiting(self) -> int:
        """Requests beyond the runner's slots: queued in its engine."""
        return max(0, self.in_use - self.plan.spec.parallel)

    def view(self) -> RunnerView:
        return RunnerView.of(self.plan.spec, self.plan.estimate, loading=False).with_use(
            in_use=self.in_use,
            last_used=self.last_used,
            draining=self.draining,
            pid=self.process.pid,
            keep_alive=self.keep_alive,
        )
