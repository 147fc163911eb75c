"""The ``/engines`` control surface (spec 2.2, 5.4-5.6): ps, df, unload, _configure."""

from __future__ import annotations

import asyncio
import importlib.util
import time
from pathlib import Path
from typing import Any

from app import errors
from app.durations import format_keep_alive
from app.logging import get_logger
from app.scheduler import runner_config
from app.scheduler.errors import SchedulerError
from app.scheduler.launch import RunnerKey
from app.scheduler.scheduler import Scheduler
from app.scheduler.snapshot import RunnerView
from app.service.backend import BACKEND, check_backend
from app.service.inference import InferenceService
from app.store import ModelStore
from app.timestamps import ZERO_TIME, go_time

log = get_logger("control")
PRELOAD_TIMEOUT_S = 600


class ControlService:
    def __init__(self, store: ModelStore, inference: InferenceService) -> None:
        self.store = store
        self.inference = inference
        self.scheduler: Scheduler = inference.scheduler
        self._tasks: set[asyncio.Task[None]] = set()

    def ps(self) -> list[dict[str, Any]]:
        now = time.time()
        return [_ps_row(view, now) for view in self.scheduler.snapshot()]

    async def df(self) -> dict[str, int]:
        return await asyncio.to_thread(self._df)

    def _df(self) -> dict[str, int]:
        spec = importlib.util.find_spec("llama_cpp")
        backend = 0
        if spec is not None and spec.submodule_search_locations:
            backend = _tree_size(Path(next(iter(spec.submodule_search_locations))))
        return {
            "models_disk_usage": _tree_size(self.store.root / "blobs"),
            "default_backend_disk_usage": backend,
        }

    async def unload(self, doc: Any) -> int:
        if not isinstance(doc, dict):
            raise errors.BadRequest("invalid request")
        check_backend(doc.get("backend") or BACKEND)
        everything = doc.get("all", False)
        if not isinstance(everything, bool):
            raise errors.BadRequest("all must be true or false")
        if everything:
            return await self.scheduler.unload(None)
        models = doc.get("models") or []
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise errors.BadRequest("models must be a list of model references")
        ids = {(await self.inference.resolve(m)).id for m in models}
        return await self.scheduler.unload(ids)

    async def configure(self, doc: Any, backend: str | None) -> None:
        check_backend(backend)
        if not isinstance(doc, dict):
            raise errors.BadRequest("invalid request")
        model = doc.get("model")
        if not isinstance(model, str) or not model.strip():
            raise errors.BadRequest("model is required")
        try:
            mode, config = runner_config.from_request(doc)
        except runner_config.ConfigError as exc:
            raise errors.BadRequest(str(exc)) from None
        entry = await self.inference.resolve(model)
        if not await self.scheduler.configure(RunnerKey(entry.id, mode), config):
            return
        log.info("model configured; preloading", model=model, mode=mode, config=config.to_json())
        task = asyncio.create_task(self._preload(model, mode))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _preload(self, model: str, mode: str) -> None:
        try:
            entry = await self.inference.resolve(model)
            async with asyncio.timeout(PRELOAD_TIMEOUT_S):
                await self.inference.load(entry, mode)
        except (errors.ServiceError, SchedulerError, TimeoutError) as exc:
            log.warning("preload after _configure failed", model=model, error=str(exc) or "timeout")
        except Exception:  # a background task: nobody else would see it
            log.exception("preload after _configure failed", model=model)

    async def configs(self, model: str | None) -> list[dict[str, Any]]:
        wanted = None
        if model:
            try:
                wanted = (await self.inference.resolve(model)).id
            except errors.ServiceError:
                return []  # an unknown (or malformed) model has no configuration
        # The store's index is a file behind a lock: read it off the event loop.
        entries = {e.id: e for e in await asyncio.to_thread(self.store.entries)}
        rows = []
        for key, config in self.scheduler.configs.listing():
            if wanted is not None and key.model_id != wanted:
                continue
            entry = entries.get(key.model_id)
            rows.append(
                {
                    "Backend": BACKEND,
                    "Model": entry.name if entry else key.model_id,
                    "ModelID": key.model_id,
                    "Mode": key.mode,
                    "Config": config.to_json(),
                }
            )
        return rows

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _ps_row(view: RunnerView, now: float) -> dict[str, Any]:
    """DMR's fields (backend_name, model_name, mode, last_used, in_use), then ours."""
    row: dict[str, Any] = {
        "backend_name": BACKEND,
        "model_name": view.name,
        "mode": view.key.mode,
        "last_used": ZERO_TIME,
    }
    if view.loading:
        row["loading"] = True
    row["keep_alive"] = "-1" if view.pinned else format_keep_alive(view.keep_alive)
    row.update(
        memory_estimate=view.memory_estimate,
        memory_by_device=view.memory_by_device,
        gpu_layers=view.gpu_layers,
        context_size=view.context_size,
        parallel=view.parallel,
        pinned=view.pinned,
    )
    if view.loading:
        return row
    if view.in_use:
        row["in_use"] = True
        row["in_flight"] = view.in_flight
        row["waiting"] = view.waiting
    else:
        assert view.last_used is not None
        row["last_used"] = go_time(view.last_used)
        expires_in = view.expires_in(now)
        if expires_in is not None:
            row["expires_in_s"] = round(expires_in, 1)
    if view.draining:
        row["draining"] = True
    row["pid"] = view.pid
    return row


def _tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0
