"""Start-up preloading from the manifest: pull or import what is missing, configure, load.

Its per-model states are what ``/readyz`` reports: the service is ready once every entry is
in the store and every ``preload: true`` entry has a runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from app import errors
from app.logging import get_logger
from app.oci import reference
from app.packaging import artifact
from app.packaging.gguf_config import GGUFError
from app.preload_manifest import ModelEntry
from app.scheduler.errors import SchedulerError
from app.scheduler.launch import RunnerKey
from app.service.distribution import DistributionService
from app.service.inference import InferenceService
from app.store import IndexEntry, ModelNotFound, ModelStore

log = get_logger("preload")
_LOG_EVERY_S = 5.0
RETRY_FIRST_S = 5.0
RETRY_MAX_S = 300.0


@dataclass
class ModelState:
    model: str
    mode: str
    state: str = "pending"  # pending, pulling, importing, loading, ready, error
    message: str | None = None
    completed: int = 0
    total: int = 0
    loaded: bool = False
    layers: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"model": self.model, "mode": self.mode, "state": self.state}
        if self.state == "pulling":
            doc.update(completed=self.completed, total=self.total)
        if self.state == "ready":
            doc["loaded"] = self.loaded
        if self.message:
            doc["message"] = self.message
        return doc


class Preloader:
    def __init__(
        self,
        entries: list[ModelEntry],
        store: ModelStore,
        distribution: DistributionService,
        inference: InferenceService,
    ) -> None:
        self.entries = entries
        self.store = store
        self.distribution = distribution
        self.inference = inference
        self.states = [ModelState(e.model, e.mode) for e in entries]

    @property
    def ready(self) -> bool:
        return all(s.state == "ready" for s in self.states)

    async def run(self) -> None:
        # Settings and pins of the models already stored apply at once, not only once the
        # entries before them are pulled: requests may come in meanwhile.
        for entry in self.entries:
            with contextlib.suppress(ModelNotFound, reference.InvalidReference):
                self._register(entry, await asyncio.to_thread(self.store.resolve, entry.model))
        pending = list(zip(self.entries, self.states, strict=True))
        delay = RETRY_FIRST_S
        while pending:
            failed = []
            for entry, state in pending:
                try:
                    await self._prepare(entry, state)
                except (errors.ServiceError, SchedulerError) as exc:
                    # A registry down at boot must not leave the service unready for good.
                    state.state, state.message = "error", f"{exc} (next try in {delay:.0f} s)"
                    log.error("preload failed", model=entry.model, error=str(exc), retry_s=delay)
                    failed.append((entry, state))
            if failed:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
            pending = failed
        if self.entries:
            log.info("preload done", models=len(self.entries))

    async def _prepare(self, entry: ModelEntry, state: ModelState) -> None:
        try:
            stored = await asyncio.to_thread(self.store.resolve, entry.model)
        except ModelNotFound:
            if entry.gguf is not None:
                state.state, state.message = "importing", None
                log.info("importing model", model=entry.model, gguf=str(entry.gguf))
                await asyncio.to_thread(self._import, entry)
            else:
                state.state, state.message = "pulling", None
                state.layers.clear()
                state.completed = state.total = 0
                await self._pull(entry, state)
            stored = await self.inference.resolve(entry.model)
        self._register(entry, stored)
        if entry.preload:
            state.state, state.message = "loading", None
            log.info("preloading model", model=entry.model, mode=entry.mode)
            await self.inference.load(stored, entry.mode)
            state.loaded = True
        state.state, state.message = "ready", None

    def _register(self, entry: ModelEntry, stored: IndexEntry) -> None:
        key = RunnerKey(stored.id, entry.mode)
        self.inference.scheduler.configs.set_base(key, entry.config, pin=entry.pin)

    def _import(self, entry: ModelEntry) -> None:
        assert entry.gguf is not None
        try:
            built = artifact.build(entry.gguf)
            tag = str(self.store.parse_reference(entry.model))  # the canonical spelling
            artifact.write_to_store(built, self.store, tag)
        except (GGUFError, OSError, ValueError) as exc:
            raise errors.ServiceError(f"cannot import the manifest's gguf: {exc}") from None

    async def _pull(self, entry: ModelEntry, state: ModelState) -> None:
        log.info("pulling model", model=entry.model)
        plan = await self.distribution.prepare_pull(entry.model, None)
        last_log = time.monotonic()
        async for line in self.distribution.pull(plan):
            if line["type"] == "progress":
                state.layers[line["layer"]["id"]] = line["layer"]["current"]
                state.total = line["total"]
                state.completed = sum(state.layers.values())
                if time.monotonic() - last_log >= _LOG_EVERY_S:
                    last_log = time.monotonic()
                    log.info(
                        "pulling model",
                        model=entry.model,
                        completed_mib=round(state.completed / 2**20, 1),
                        total_mib=round(state.total / 2**20, 1),
                    )
            elif line["type"] == "error":
                raise errors.ServiceError(line["message"])
        log.info("model pulled", model=entry.model, bytes=state.total)
