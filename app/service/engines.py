"""The ``/engines`` control surface (spec 2.2, 5.4-5.6): status, ps, df, unload, _configure."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app import errors
from app.logging import get_logger
from app.runner import SOURCE_ROOT
from app.scheduler import config as runner_config
from app.scheduler.durations import format_keep_alive
from app.scheduler.runners import Plan, RunnerManager
from app.service.inference import BACKENDS, InferenceService
from app.store import ModelStore

log = get_logger("engines")
BACKEND = BACKENDS[0]
_ZERO_TIME = "0001-01-01T00:00:00Z"
PRELOAD_TIMEOUT_S = 600


class EnginesService:
    def __init__(self, store: ModelStore, inference: InferenceService) -> None:
        self.store = store
        self.inference = inference
        self.runners: RunnerManager = inference.runners
        self.backend: dict[str, Any] = {}  # what the probe found; empty until it answers
        self._tasks: set[asyncio.Task[None]] = set()

    async def probe(self) -> None:
        """Ask a child process what llama.cpp can use, and say it in the log."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "app.runner.probe",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=SOURCE_ROOT,
        )  # fmt: skip
        out, err = await proc.communicate()
        try:
            self.backend = json.loads(out)
        except ValueError:
            tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
            self.backend = {"installed": True, "error": f"the llama.cpp probe failed: {tail[0]}"}
        if not self.backend.get("installed"):
            log.warning("llama.cpp is not installed", error=self.backend.get("error"))
        elif "error" in self.backend:
            log.error("backend unusable", error=self.backend["error"])
        else:
            gpu = self.runners.defaults.gpu_layers
            log.info(
                "backend",
                llama_cpp_python=self.backend["version"],
                device=self.backend["device"],
                gpu_layers="all" if gpu is None and self.backend["gpu_offload"] else gpu or 0,
                note=None
                if self.backend["gpu_offload"]
                else "no GPU found (or this llama.cpp build has no GPU offload); "
                "inference runs on the CPU",
            )

    def status(self) -> dict[str, str]:
        b = self.backend
        if not b:
            return {BACKEND: "Installing: checking llama.cpp"}
        if not b.get("installed"):
            return {BACKEND: f"Not Installed: llama-cpp-python is missing ({b.get('error')})"}
        if "error" in b:
            return {BACKEND: f"Error: {b['error']}"}
        return {BACKEND: f"Running: llama.cpp (llama-cpp-python {b['version']}) on {b['device']}"}

    def ps(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        now = datetime.now(UTC).timestamp()
        for key, loading in self.runners.loading.items():
            rows.append(self._row(key[1], loading.plan, loading=True))
        for key, runner in self.runners.runners.items():
            row = self._row(key[1], runner.plan, loading=False)
            if runner.in_use:
                row["in_use"] = True
                row["in_flight"] = min(runner.in_use, runner.plan.parallel)
                row["waiting"] = runner.waiting
            else:
                row["last_used"] = _iso(runner.last_used)
                if runner.plan.keep_alive is not None and not runner.plan.pinned:
                    row["expires_in_s"] = max(
                        0, round(runner.last_used + runner.plan.keep_alive - now, 1)
                    )
            if runner.draining:
                row["draining"] = True
            row["pid"] = runner.proc.pid
            rows.append(row)
        return rows

    def _row(self, mode: str, plan: Plan, loading: bool) -> dict[str, Any]:
        row: dict[str, Any] = {
            "backend_name": BACKEND,
            "model_name": plan.name,
            "mode": mode,
            "last_used": _ZERO_TIME,
        }
        if loading:
            row["loading"] = True
        row["keep_alive"] = "-1" if plan.pinned else format_keep_alive(plan.keep_alive)
        row.update(
            memory_estimate=plan.estimate.total,
            context_size=plan.estimate.ctx_per_slot,
            parallel=plan.parallel,
            pinned=plan.pinned,
        )
        return row

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
        backend = doc.get("backend") or BACKEND
        if backend not in BACKENDS:
            raise errors.NotFound("backend not found")
        everything = doc.get("all", False)
        if not isinstance(everything, bool):
            raise errors.BadRequest("all must be true or false")
        if everything:
            return await self.runners.unload(None)
        models = doc.get("models") or []
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise errors.BadRequest("models must be a list of model references")
        ids = {(await self.inference.resolve(m)).id for m in models}
        return await self.runners.unload(ids)

    async def configure(self, doc: Any, backend: str | None) -> None:
        if backend is not None and backend not in BACKENDS:
            raise errors.NotFound("backend not found")
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
        if not await self.runners.configure((entry.id, mode), config):
            return
        log.info("model configured; preloading", model=model, mode=mode, config=config.to_json())
        task = asyncio.create_task(self._preload(model, mode))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _preload(self, model: str, mode: str) -> None:
        try:
            entry = await self.inference.resolve(model)
            async with asyncio.timeout(PRELOAD_TIMEOUT_S):
                async with self.inference.runner(entry, mode, model):
                    pass
        except (errors.ServiceError, TimeoutError) as exc:
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
        for key, config in {**self.runners.base_configs, **self.runners.configs}.items():
            if wanted is not None and key[0] != wanted:
                continue
            entry = entries.get(key[0])
            rows.append(
                {
                    "Backend": BACKEND,
                    "Model": entry.tags[0] if entry and entry.tags else key[0],
                    "ModelID": key[0],
                    "Mode": key[1],
                    "Config": config.to_json(),
                }
            )
        return rows

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0
