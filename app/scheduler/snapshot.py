"""What the scheduler shows of a runner (``/engines/ps``): a copy, never its live record."""

from __future__ import annotations

from dataclasses import dataclass, replace

from app.scheduler import memory
from app.scheduler.launch import LaunchSpec, RunnerKey


@dataclass(frozen=True)
class RunnerView:
    key: RunnerKey
    name: str
    loading: bool
    keep_alive: float | None
    pinned: bool
    memory_estimate: int
    memory_by_device: dict[str, int]  # {"host": bytes, "CUDA0": bytes}
    gpu_layers: int
    context_size: int  # tokens per slot
    parallel: int
    in_use: int = 0  # requests holding it, queued ones included
    last_used: float | None = None  # epoch seconds; None while loading
    draining: bool = False
    pid: int | None = None

    @classmethod
    def of(cls, spec: LaunchSpec, estimate: memory.Estimate, loading: bool) -> RunnerView:
        return cls(
            key=spec.key,
            name=spec.name,
            loading=loading,
            keep_alive=spec.keep_alive,
            pinned=spec.pinned,
            memory_estimate=estimate.total,
            memory_by_device=estimate.devices(),
            gpu_layers=estimate.gpu_layers,
            context_size=estimate.ctx_per_slot,
            parallel=spec.parallel,
        )

    def with_use(
        self, in_use: int, last_used: float, draining: bool, pid: int, keep_alive: float | None
    ) -> RunnerView:
        return replace(
            self,
            in_use=in_use,
            last_used=last_used,
            draining=draining,
            pid=pid,
            keep_alive=keep_alive,
        )

    @property
    def in_flight(self) -> int:
        return min(self.in_use, self.parallel)

    @property
    def waiting(self) -> int:
        return max(0, self.in_use - self.parallel)

    def expires_in(self, now: float) -> float | None:
        """Seconds until keep_alive stops it; None when it is busy, pinned or kept forever."""
        if self.in_use or self.pinned or self.keep_alive is None or self.last_used is None:
            return None
        return max(0.0, self.last_used + self.keep_alive - now)
