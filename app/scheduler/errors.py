"""What the scheduler refuses, and why. The API's error table maps each to a status; the
message is the text a client reads."""

from __future__ import annotations


class SchedulerError(Exception):
    """A request the scheduler cannot serve now."""

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        # Seconds after which the same request may succeed; None: it will not by waiting.
        self.retry_after = retry_after


class QueueFull(SchedulerError):
    """More requests wait for this runner than MODEL_RUNNER_MAX_QUEUE allows."""


class NoMemory(SchedulerError):
    """The model does not fit in the memory limit, now or ever (``retry_after`` tells)."""


class ShuttingDown(SchedulerError):
    pass


class RunnerBusy(SchedulerError):
    """A configuration change while the model's runner is serving or loading."""


class LoadFailed(SchedulerError):
    """The runner could not start, or died while loading; the message has its last words."""
