"""Inference requests: check them, find the model, lease its runner (spec 5.1).

The request body goes to the runner unchanged; this only reads the ``model`` field.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from app import errors
from app.distribution import reference
from app.scheduler.runners import Runner, RunnerManager
from app.store import IndexEntry, ModelNotFound, ModelStore

BACKENDS = ("llama.cpp",)


class InferenceService:
    def __init__(self, store: ModelStore, runners: RunnerManager) -> None:
        self.store = store
        self.runners = runners

    async def model_for(self, body: bytes, backend: str | None) -> tuple[IndexEntry, str]:
        """The stored model a request names, and the name it used."""
        if backend is not None and backend not in BACKENDS:
            raise errors.NotFound("backend not found")
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise errors.BadRequest("invalid request") from None
        model = doc.get("model") if isinstance(doc, dict) else None
        if not isinstance(model, str) or not model.strip():
            raise errors.BadRequest("model is required")
        return await self.resolve(model), model

    async def resolve(self, model: str) -> IndexEntry:
        try:
            return await asyncio.to_thread(self.store.resolve, model)
        except reference.InvalidReference:
            raise errors.BadRequest(f"Invalid model reference: {model!r}") from None
        except ModelNotFound:
            raise errors.NotFound(
                f"error while getting model: get model '\"{model}\"': model not found"
            ) from None

    def runner(
        self, entry: IndexEntry, mode: str, name: str
    ) -> contextlib.AbstractAsyncContextManager[Runner]:
        """A runner for the request, counted as busy (never evicted) until the block ends."""
        return self.runners.use(entry, mode, name)
