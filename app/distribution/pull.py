"""Pull a model from an OCI registry into the store (spec 3.1).

``plan`` does everything that can fail with a clean HTTP status before any progress is streamed:
parse the reference, authenticate, fetch and check the manifest and config. ``run`` downloads
the missing layers in parallel, with progress, and commits the model last.

Downloads are shared: a layer wanted by two pulls at once is fetched once, and both see its
progress. A download stops when the last pull waiting for it goes away; its partial file stays
for the next pull to resume with ``Range``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from app.distribution import progress
from app.distribution.auth import load_credentials
from app.distribution.registry import Registry, RegistryError, TooLarge
from app.logging import get_logger
from app.oci.manifest import Descriptor, Manifest, parse_config, parse_manifest
from app.oci.reference import Reference
from app.settings import Settings
from app.store import IndexEntry, ModelStore, bundle, space
from app.store.partial import PartialBlob

log = get_logger("pull")

# DMR's limit: more pulls than this wait their turn.
MAX_CONCURRENT_PULLS = 2
# A network blip mid-blob is retried from where it stopped before the pull gives up.
BLOB_ATTEMPTS = 3
_WRITE_BATCH = 1024 * 1024
_MAX_IN_FLIGHT = 8
_FLUSH_EVERY = 32 * 1024 * 1024
_MAX_CONFIG_BYTES = 4 * 1024 * 1024
_INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)


class PullError(RegistryError):
    pass


@dataclass
class PullPlan:
    ref: Reference
    registry: Registry
    manifest_raw: bytes
    manifest: Manifest
    model_id: str
    cached: IndexEntry | None
    config_raw: bytes = b""

    @property
    def tag(self) -> str | None:
        return None if self.ref.digest else str(self.ref)


async def open_registry(
    session: aiohttp.ClientSession, ref: Reference, settings: Settings, bearer_token: str | None
) -> Registry:
    credentials = await asyncio.to_thread(load_credentials, settings.docker_config, ref.registry)
    return Registry(
        session=session,
        ref=ref,
        insecure=settings.is_insecure(ref.registry),
        credentials=credentials,
        bearer_token=bearer_token,
    )


@dataclass
class _Download:
    """One blob being fetched, and the pulls watching it."""

    descriptor: Descriptor
    current: int = 0
    listeners: set[Callable[[int], None]] = field(default_factory=set)
    waiters: int = 0
    task: asyncio.Task[None] | None = None

    def report(self, current: int) -> None:
        self.current = current
        for listener in list(self.listeners):
            listener(current)


class Puller:
    def __init__(
        self,
        store: ModelStore,
        settings: Settings,
        session: aiohttp.ClientSession,
        downloaded: Callable[[int], None],
    ) -> None:
        self.store = store
        self.settings = settings
        self.session = session
        self._downloaded = downloaded  # told of every chunk received from a registry, in bytes
        self._downloads: dict[str, _Download] = {}
        self._stopping: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_PULLS)

    async def plan(self, ref_text: str, bearer_token: str | None = None) -> PullPlan:
        ref = self.store.parse_reference(ref_text)
        registry = await open_registry(self.session, ref, self.settings, bearer_token)
        raw, media_type = await registry.manifest()
        if media_type in _INDEX_TYPES:
            raise PullError(f"{ref} is a multi-platform image index, not a model")
        model_id = "sha256:" + hashlib.sha256(raw).hexdigest()
        if ref.digest and ref.digest != model_id:
            raise PullError(f"manifest digest mismatch: asked for {ref.digest}, got {model_id}")
        manifest = parse_manifest(raw)
        bundle.layout(manifest)  # a hostile file path fails here, before anything is written
        cached, has_config = await asyncio.to_thread(self._stored, model_id, manifest.config)
        plan = PullPlan(ref, registry, raw, manifest, model_id, cached)
        if cached is None and not has_config:
            if manifest.config.size > _MAX_CONFIG_BYTES:
                raise TooLarge(f"config of {ref} is larger than {space.human(_MAX_CONFIG_BYTES)}")
            plan.config_raw = await registry.blob_bytes(
                manifest.config.digest, manifest.config.size
            )
            if "sha256:" + hashlib.sha256(plan.config_raw).hexdigest() != manifest.config.digest:
                raise PullError(f"config blob digest mismatch for {manifest.config.digest}")
            parse_config(plan.config_raw)
        return plan

    def _stored(self, model_id: str, config: Descriptor) -> tuple[IndexEntry | None, bool]:
        """The model's entry if it is stored already, and whether its config blob is."""
        cached = next((e for e in self.store.entries() if e.id == model_id), None)
        return cached, self.store.has_blob(config.digest, config.size)

    async def run(self, plan: PullPlan) -> AsyncIterator[progress.Message]:
        if plan.cached is not None:
            if plan.tag:
                await asyncio.to_thread(self.store.tag, plan.model_id, plan.tag)
            size = await asyncio.to_thread(self._size, plan.cached)
            yield progress.message("success", f"Using cached model: {size}")
            return
        blobs = list({d.digest: d for d in plan.manifest.blobs}.values())
        async with self._slots:
            fresh: list[Descriptor] = []  # what this pull adds to the store
            try:
                with self.store.pinned(d.digest for d in blobs):
                    fresh = await asyncio.to_thread(self._missing, blobs)
                    await self._check_space(plan, fresh)
                    log.info(
                        "downloading model",
                        model=str(plan.ref),
                        blobs=len(fresh),
                        bytes=sum(d.size for d in fresh),
                    )
                    async with contextlib.aclosing(self._download_layers(plan, fresh)) as lines:
                        async for line in lines:
                            yield line
                    # The config goes in last: a pull that fails before it leaves no config.
                    if plan.config_raw:
                        await asyncio.to_thread(self._write_config, plan)
                    tags = [plan.tag] if plan.tag else []
                    entry = await asyncio.to_thread(self.store.add_model, plan.manifest_raw, tags)
            except BaseException as exc:
                await asyncio.shield(self._abandon(fresh, exc))
                raise
            with contextlib.suppress(bundle.BundleError):  # e.g. safetensors: no llama.cpp bundle
                await asyncio.to_thread(self.store.bundle, entry)
            log.info("model pulled", model=str(plan.ref), id=plan.model_id)
            # Still holding the slot: the next waiting pull starts only after this one reported.
            yield progress.message("success", "Model pulled successfully")

    async def _check_space(self, plan: PullPlan, fresh: list[Descriptor]) -> None:
        """Refuse before downloading anything what the disk cannot hold (with its reserve)."""
        ours = {d.digest for d in fresh}
        pending = sum(
            d.descriptor.size - d.current for k, d in self._downloads.items() if k not in ours
        )
        await asyncio.to_thread(self._check_space_now, plan, fresh, pending)

    def _check_space_now(self, plan: PullPlan, fresh: list[Descriptor], pending: int) -> None:
        # Bytes a resumed download already has on disk are written; only the rest is needed.
        needed = sum(max(0, d.size - self.store.partial_size(d.digest)) for d in fresh)
        space.check_free_space(self.store.blobs_dir, needed, str(plan.ref), pending)

    async def _abandon(self, fresh: list[Descriptor], exc: BaseException) -> None:
        """A failed pull leaves no blob a model does not use: what it finished goes back to being
        partial downloads for the next pull, or, when the disk is full, goes altogether."""
        ours = {d.digest for d in fresh}
        stopping = [t for k, t in self._stopping.items() if k in ours]
        if stopping:  # a cancelled download may be publishing its blob right now
            await asyncio.wait(stopping)
        resumable = not space.is_disk_full(exc)
        await asyncio.to_thread(self.store.discard_blobs, ours, resumable)

    def _size(self, entry: IndexEntry) -> str:
        try:
            return str(self.store.config(entry).get("config", {}).get("size", ""))
        except (OSError, ValueError):
            return ""

    def _write_config(self, plan: PullPlan) -> None:
        with self.store.blob_writer(plan.manifest.config.digest) as w:
            w.write(plan.config_raw)
            w.commit()

    def _missing(self, blobs: list[Descriptor]) -> list[Descriptor]:
        return [d for d in blobs if not self.store.has_blob(d.digest, d.size)]

    async def _download_layers(
        self, plan: PullPlan, fresh: list[Descriptor]
    ) -> AsyncIterator[progress.Message]:
        layers = {layer.digest: layer for layer in plan.manifest.layers}
        total = sum(layer.size for layer in layers.values())
        wanted = {d.digest for d in fresh}
        missing = [d for d in layers.values() if d.digest in wanted]
        queue: asyncio.Queue[progress.Message] = asyncio.Queue()
        waits = []
        for desc in missing:
            reporter = progress.LayerReporter(
                queue.put_nowait, "pull", total, desc.digest, desc.size
            )
            waits.append(self._wait_for(desc, plan.registry, reporter))
        async with contextlib.aclosing(progress.relay(queue, all_or_nothing(waits))) as lines:
            async for line in lines:
                yield line

    async def _wait_for(
        self, desc: Descriptor, registry: Registry, reporter: Callable[[int], None]
    ) -> None:
        download = self._downloads.get(desc.digest)
        if download is None:
            download = _Download(desc)
            download.task = asyncio.create_task(self._fetch(download, registry))
            self._downloads[desc.digest] = download
            download.task.add_done_callback(lambda _: self._finished(download))
        assert download.task is not None
        download.listeners.add(reporter)
        download.waiters += 1
        if download.current:  # joining a download under way: show where it is
            reporter(download.current)
        try:
            await asyncio.shield(download.task)
        finally:
            download.waiters -= 1
            download.listeners.discard(reporter)
            if download.waiters == 0 and not download.task.done():
                # Nobody wants it any more: stop, keep the partial file for a later resume.
                # A pull arriving meanwhile starts afresh once this one has let go of the file.
                if self._downloads.get(desc.digest) is download:
                    del self._downloads[desc.digest]
                self._stopping[desc.digest] = download.task
                download.task.cancel()

    def _finished(self, download: _Download) -> None:
        digest = download.descriptor.digest
        if self._downloads.get(digest) is download:
            del self._downloads[digest]
        if self._stopping.get(digest) is download.task:
            del self._stopping[digest]

    async def _fetch(self, download: _Download, registry: Registry) -> None:
        desc = download.descriptor
        stopping = self._stopping.get(desc.digest)
        if stopping is not None:
            await asyncio.wait([stopping])  # it still holds the partial file's lock
        partial = await asyncio.to_thread(self.store.partial_blob, desc.digest, desc.size)
        try:
            if partial.size:
                log.info("resuming download", blob=desc.digest, offset=partial.size)
            if partial.size < desc.size:
                await self._download(partial, download, registry)
            else:  # a whole layer a failed pull left behind: it needs no bytes, only checking
                download.report(partial.size)
            # Cancelled mid-commit (another layer failed), the task still ends only once the
            # blob is published or not: a failed pull's clean-up runs after it, never before.
            commit = asyncio.ensure_future(asyncio.to_thread(partial.commit))
            try:
                await asyncio.shield(commit)
            except asyncio.CancelledError:
                await asyncio.wait([commit])
                raise
        except BaseException as exc:
            if space.is_disk_full(exc):
                await asyncio.shield(asyncio.to_thread(partial.discard))
                raise space.InsufficientStorage(
                    f"the disk filled up while downloading {desc.digest}; its partial download "
                    "was dropped to free the space"
                ) from None
            await asyncio.shield(asyncio.to_thread(partial.close))
            raise

    async def _download(
        self, partial: PartialBlob, download: _Download, registry: Registry
    ) -> None:
        """Fetch the rest of the blob; a network blip is resumed where it stopped."""
        for attempt in range(1, BLOB_ATTEMPTS + 1):
            try:
                await self._stream_into(partial, download, registry)
                return
            except (
                aiohttp.ClientPayloadError,
                aiohttp.ClientConnectionError,
                TimeoutError,
            ) as exc:
                if attempt == BLOB_ATTEMPTS:
                    raise PullError(
                        f"downloading {download.descriptor.digest} failed: {exc or 'timed out'}"
                    ) from None
                log.warning(
                    "blob download interrupted, resuming",
                    blob=download.descriptor.digest,
                    error=str(exc),
                )
                await asyncio.sleep(0.5 * attempt)

    async def _stream_into(
        self, partial: PartialBlob, download: _Download, registry: Registry
    ) -> None:
        resp = await registry.open_blob(download.descriptor.digest, partial.size)
        async with resp:
            if resp.status != 206 and partial.size:
                await asyncio.to_thread(partial.restart)  # the registry ignored Range
            download.report(partial.size)
            await _pipe(resp, partial, download, self._downloaded)
        if partial.size < download.descriptor.size:
            raise aiohttp.ClientPayloadError("the registry closed the blob stream early")


async def _pipe(
    resp: aiohttp.ClientResponse,
    partial: PartialBlob,
    download: _Download,
    downloaded: Callable[[int], None],
) -> None:
    """Copy the body into the partial blob. Network reads overlap hashing and writing, which
    run in order on one thread of this download's own; a few batches may be in flight."""
    loop = asyncio.get_running_loop()
    in_flight: deque[asyncio.Future[None]] = deque()
    batch: list[bytes] = []
    batched = 0
    flushing: asyncio.Future[None] | None = None
    flushed = received = partial.size
    expected = download.descriptor.size
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="blob-writer") as writer,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="blob-flusher") as flusher,
    ):
        try:
            async for chunk in resp.content.iter_any():
                received += len(chunk)
                downloaded(len(chunk))
                if received > expected:
                    raise PullError(
                        f"blob {download.descriptor.digest} is larger than its manifest says "
                        f"({expected} bytes)"
                    )
                batch.append(chunk)
                batched += len(chunk)
                if batched < _WRITE_BATCH:
                    continue
                in_flight.append(loop.run_in_executor(writer, partial.write_all, batch))
                batch, batched = [], 0
                while in_flight and (in_flight[0].done() or len(in_flight) > _MAX_IN_FLIGHT):
                    await in_flight.popleft()
                    download.report(partial.size)
                # Push written data to disk while the download goes on, so that the fsync
                # before the blob is published has little left to do.
                if partial.size - flushed >= _FLUSH_EVERY and (flushing is None or flushing.done()):
                    flushed = partial.size
                    flushing = loop.run_in_executor(flusher, partial.flush_to_disk)
            if batch:
                in_flight.append(loop.run_in_executor(writer, partial.write_all, batch))
        finally:
            # Never leave a write running while the file is closed or resumed.
            for future in [*in_flight, *([flushing] if flushing else [])]:
                await asyncio.shield(future)
    download.report(partial.size)


async def all_or_nothing(coros: list[Coroutine[Any, Any, None]]) -> None:
    """Run all; on the first failure cancel the rest and raise that failure itself."""
    try:
        async with asyncio.TaskGroup() as group:
            for coro in coros:
                group.create_task(coro)
    except BaseExceptionGroup as group_error:
        raise group_error.exceptions[0] from None
