"""Runners that keep failing to load are not started again on every request.

A crash at load costs seconds and says the same each time: after ``LOAD_FAILURES`` failed loads
of a runner within ``WINDOW_S``, requests get the last failure at once until the oldest of them
leaves the window, or the model is reconfigured or unloaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from app.scheduler.errors import LoadFailed
from app.scheduler.launch import RunnerKey

LOAD_FAILURES = 2
WINDOW_S = 60.0


class LoadFailures:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._failures: dict[RunnerKey, list[tuple[float, str]]] = {}  # (when, why)

    def record(self, key: RunnerKey, error: LoadFailed) -> None:
        self._failures.setdefault(key, []).append((self._clock(), str(error)))

    def forget_runner(self, key: RunnerKey) -> None:
        """After a successful load or a new configuration: try again."""
        self._failures.pop(key, None)

    def forget_models(self, model_ids: set[str] | None) -> None:
        """After an unload of these models (all when None): try again."""
        for k in [k for k in self._failures if model_ids is None or k.model_id in model_ids]:
            del self._failures[k]

    def check(self, key: RunnerKey, name: str) -> None:
        """Raise LoadFailed, with when to try again, while the runner is held back."""
        now = self._clock()
        recent = [f for f in self._failures.get(key, []) if now - f[0] < WINDOW_S]
        self._failures[key] = recent
        if len(recent) < LOAD_FAILURES:
            return
        wait = max(1, math.ceil(recent[0][0] + WINDOW_S - now))
        last = recent[-1][1].removeprefix("unable to load runner: ")
        raise LoadFailed(
            f"unable to load runner: {name} failed to load {len(recent)} times in the last "
            f"{WINDOW_S:.0f} s, so it is not started again for {wait} s (or until it is "
            f"reconfigured or unloaded); the last time: {last}",
            retry_after=wait,
        )
