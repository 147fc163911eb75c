"""What the scheduler tells whoever counts its work (the front's /metrics): loads and evictions.

Only events go through here; its state (runners, memory) is read from ``Scheduler.snapshot``
when it is asked for.
"""

from __future__ import annotations

from typing import Protocol

from app.scheduler.launch import RunnerKey

# Why a runner was evicted: to make room for another, or idle past its keep_alive.
FOR_MEMORY = "memory"
KEEP_ALIVE = "keep_alive"


class SchedulerObserver(Protocol):
    def loaded(self, key: RunnerKey, seconds: float) -> None:
        """A runner started and serves, ``seconds`` after its process was started."""

    def load_failed(self, key: RunnerKey) -> None:
        """A runner's process died or gave up while loading its model."""

    def evicted(self, key: RunnerKey, reason: str) -> None:
        """The scheduler is stopping a runner of its own accord (FOR_MEMORY or KEEP_ALIVE)."""


class Unobserved:
    """The observer of a scheduler that nobody counts."""

    def loaded(self, key: RunnerKey, seconds: float) -> None:
        pass

    def load_failed(self, key: RunnerKey) -> None:
        pass

    def evicted(self, key: RunnerKey, reason: str) -> None:
        pass
