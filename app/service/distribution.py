"""Pull and push for the HTTP API and the CLI: registry errors become DMR's answers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import aiohttp

from app import errors
from app.distribution import progress, pull, push, registry
from app.oci import reference
from app.oci.blobs import BlobSource, file_source
from app.oci.manifest import InvalidManifest, UnsupportedConfig, parse_manifest
from app.service.metrics import PullMetrics
from app.settings import Settings
from app.store import ModelNotFound, ModelStore, StoreError, space
from app.store.bundle import BundleError
from app.store.partial import PartialBlobError


@contextmanager
def _mapped(action: str) -> Iterator[None]:
    """Registry and store failures as the status and text DMR gives them (spec 3.1, 3.7)."""
    try:
        yield
    except reference.InvalidReference:
        raise errors.BadRequest("Invalid model reference") from None
    except registry.Unauthorized:
        raise errors.Unauthorized("Unauthorized") from None
    except (registry.NotFound, ModelNotFound):
        raise errors.NotFound("Model not found") from None
    except UnsupportedConfig as exc:
        raise errors.Unsupported(str(exc)) from None
    except registry.TooLarge as exc:
        raise errors.Unsupported(f"error while {action} model: {exc}") from None
    except space.InsufficientStorage as exc:
        raise errors.InsufficientStorage(f"error while {action} model: {exc}") from None
    except OSError as exc:
        if not space.is_disk_full(exc):
            raise errors.ServiceError(f"error while {action} model: {exc}") from None
        raise errors.InsufficientStorage(
            f"error while {action} model: no space left on the disk"
        ) from None
    except (
        registry.RegistryError,
        InvalidManifest,
        StoreError,
        PartialBlobError,
        BundleError,
    ) as exc:
        raise errors.ServiceError(f"error while {action} model: {exc}") from None


@dataclass
class PushJob:
    registry: registry.Registry
    manifest_raw: bytes
    blobs: list[BlobSource]
    total: int


class DistributionService:
    def __init__(
        self,
        store: ModelStore,
        settings: Settings,
        session: aiohttp.ClientSession,
        metrics: PullMetrics,
    ) -> None:
        self.store = store
        self.settings = settings
        self.session = session
        self.metrics = metrics
        self.puller = pull.Puller(store, settings, session, metrics.downloaded)

    async def prepare_pull(self, ref: str, bearer_token: str | None) -> pull.PullPlan:
        with _mapped("pulling"):
            return await self.puller.plan(ref, bearer_token)

    def pull(self, plan: pull.PullPlan) -> AsyncIterator[progress.Message]:
        lines = _mapped_stream(self.puller.run(plan), "pulling")
        return self.metrics.timed(lines, cached=plan.cached is not None)

    async def prepare_push(self, ref: str, bearer_token: str | None) -> PushJob:
        """Push a stored model under the name it is asked for by."""
        with _mapped("pushing"):
            raw, blobs = await asyncio.to_thread(self._stored, ref)
        return await prepare_push_blobs(self.session, self.settings, ref, raw, blobs, bearer_token)

    def _stored(self, ref: str) -> tuple[bytes, list[BlobSource]]:
        """A stored model's manifest and blobs (reads the index and the manifest)."""
        raw = self.store.manifest_bytes(self.store.resolve(ref))
        blobs = parse_manifest(raw).blobs
        return raw, [file_source(d, self.store.blob_path(d.digest)) for d in blobs]

    def push(self, job: PushJob) -> AsyncIterator[progress.Message]:
        return push_stream(job)


async def prepare_push_blobs(
    session: aiohttp.ClientSession,
    settings: Settings,
    ref: str,
    manifest_raw: bytes,
    blobs: list[BlobSource],
    bearer_token: str | None,
) -> PushJob:
    """Everything that can fail with a clean status before progress starts: the name, the
    registry's answer, and our right to push there. It needs no store (``package --push``)."""
    with _mapped("pushing"):
        target = reference.parse(ref, settings.default_registry)
        if reference.looks_like_id(ref.strip()) or target.digest:
            raise reference.InvalidReference("push needs a name with a tag, not an ID")
        reg = await pull.open_registry(session, target, settings, bearer_token)
        await reg.check_push_access()
    layers = {d.digest for d in parse_manifest(manifest_raw).layers}
    total = sum(b.descriptor.size for b in blobs if b.descriptor.digest in layers)
    return PushJob(reg, manifest_raw, blobs, total)


def push_stream(job: PushJob) -> AsyncIterator[progress.Message]:
    return _mapped_stream(
        push.push(job.registry, job.manifest_raw, job.blobs, job.total), "pushing"
    )


async def _mapped_stream(
    lines: AsyncIterator[progress.Message], action: str
) -> AsyncIterator[progress.Message]:
    with _mapped(action):
        async with contextlib.aclosing(lines) as closing:
            async for line in closing:
                yield line
