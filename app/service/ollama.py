"""What Ollama's API asks of the store and the scheduler (spec 7.1): its model listings, the
runner settings its requests carry (keep_alive, num_ctx), loading and unloading, delete and
copy. Shapes live in app/protocols/ollama.py; no HTTP here."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from app import errors
from app.durations import KeepAlive
from app.logging import get_logger
from app.protocols import ollama as protocol
from app.runner.tools import template_knows_tools
from app.scheduler.errors import SchedulerError
from app.scheduler.snapshot import RunnerView
from app.service.control import ControlService
from app.service.models import ModelService
from app.service.views import created_seconds, model_config
from app.store import IndexEntry, ModelStore
from app.timestamps import ZERO_TIME, go_time

log = get_logger("ollama")


def not_found(model: str) -> errors.NotFound:
    """Ollama's words, which its clients show (``ollama pull`` is the way out)."""
    return errors.NotFound(f'model "{model}" not found, try pulling it first')


class OllamaService:
    def __init__(self, store: ModelStore, models: ModelService, control: ControlService) -> None:
        self.store = store
        self.models = models
        self.control = control

    async def resolve(self, model: str) -> IndexEntry:
        try:
            return await self.control.inference.resolve(model)
        except errors.NotFound:
            raise not_found(model) from None

    # -- listings ---------------------------------------------------------------------------
    async def tags(self) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._tags)

    def _tags(self) -> list[dict[str, Any]]:
        # One row per tag, as DMR lists them (the ID for a model without one).
        return [
            replace(facts, name=name).listed()
            for entry, facts in self.models.views(self._facts)
            for name in entry.tags or (entry.id,)
        ]

    async def ps(self) -> list[dict[str, Any]]:
        views = [v for v in self.control.scheduler.snapshot() if not v.loading]
        return await asyncio.to_thread(self._running, views) if views else []

    def _running(self, views: list[RunnerView]) -> list[dict[str, Any]]:
        wanted = {view.key.model_id for view in views}
        entries = [entry for entry in self.store.entries() if entry.id in wanted]
        facts = {entry.id: known for entry, known in self.models.views(self._facts, entries)}
        now = time.time()
        return [
            protocol.running(
                known,
                view.memory_estimate,
                sum(b for device, b in view.memory_by_device.items() if device != "host"),
                _expires_at(view, now),
                view.context_size,
            )
            for view in views
            if (known := facts.get(view.key.model_id)) is not None
        ]

    async def show(self, model: str) -> dict[str, Any]:
        entry = await self.resolve(model)
        return await asyncio.to_thread(self._show, entry)

    def _show(self, entry: IndexEntry) -> dict[str, Any]:
        facts = self._facts(entry, self.store.config(entry))
        bundle = self.store.bundle(entry)
        template = _read_text(bundle.chat_template)
        capabilities = ["completion"]
        if template and template_knows_tools(template):
            capabilities.append("tools")
        arch = facts.config.get("architecture") or ""
        if f"{arch}.pooling_type" in (facts.config.get("gguf") or {}):
            capabilities.append("embedding")
        return protocol.show(facts, template, capabilities)

    def _facts(self, entry: IndexEntry, doc: dict[str, Any]) -> protocol.ModelFacts:
        size = sum(blob.size for blob in self.store.manifest(entry).blobs)
        return protocol.ModelFacts(
            name=entry.name,
            digest=entry.hex,
            size=size,
            modified_at=go_time(created_seconds(doc)),
            config=model_config(doc),
        )

    # -- runners ----------------------------------------------------------------------------
    async def apply(self, model: str, mode: str, settings: protocol.Settings) -> None:
        """A request's num_ctx, as DMR applies it: through ``_configure`` (an idle runner
        restarts with it, as Ollama reloads), a refusal (the runner is busy) only logged, so
        the request is still answered."""
        doc = settings.configure_body(model, mode)
        if doc is None:
            return
        try:
            await self.control.configure(doc, None)
        except errors.NotFound:
            raise not_found(model) from None
        except (errors.ServiceError, SchedulerError) as exc:
            log.info("request's runner settings not applied", model=model, error=str(exc))

    async def load(self, model: str, mode: str, keep_alive: KeepAlive | None) -> str:
        """Have the model's runner loaded (to stay ``keep_alive``); the model's one name."""
        entry = await self.resolve(model)
        await self.control.inference.load(entry, mode, keep_alive)
        return entry.name

    async def unload(self, model: str) -> str:
        """Stop the model's idle runners; the model's one name."""
        entry = await self.resolve(model)
        await self.control.scheduler.unload({entry.id})
        return entry.name

    # -- changes ----------------------------------------------------------------------------
    async def delete(self, model: str) -> None:
        """DMR's order: unload the model's runners first, then delete it without force."""
        await self.unload(model)
        await self.models.delete_model(model, force=False)

    async def copy(self, source: str, destination: str) -> None:
        await self.resolve(source)
        name, _, tag = destination.rpartition(":")
        if not name or "/" in tag:  # no tag: the colon (if any) was a registry's port
            name, tag = destination, "latest"
        await self.models.tag_model(source, name, tag)


def _expires_at(view: RunnerView, now: float) -> str:
    """When keep_alive will stop it: counted from now while it serves, never for a pinned or
    kept-forever runner (Go's zero time, as DMR writes it), nor past year 9999."""
    if view.pinned or view.keep_alive is None:
        return ZERO_TIME
    expires_in = view.expires_in(now)
    try:
        return go_time(now + (view.keep_alive if expires_in is None else expires_in))
    except (ValueError, OverflowError, OSError):  # "100000000h": beyond any calendar
        return ZERO_TIME


def _read_text(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
