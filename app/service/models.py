"""Model management: the behaviour of DMR's models handler (spec 3.2-3.6, 3.8, 6.1).

Every public method reads or writes the store, so each runs in a worker thread (``in_thread``):
callers await them from the event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO, TypeVar

from app import errors
from app.distribution import progress
from app.logging import get_logger
from app.oci import reference
from app.oci.blobs import BlobSource
from app.oci.manifest import InvalidManifest, UnsupportedConfig
from app.oci.tarball import iter_tar
from app.service import in_thread
from app.service.views import model_json, openai_json
from app.store import (
    IndexEntry,
    ModelNotFound,
    ModelStore,
    MultipleTags,
    StoreError,
    importer,
    space,
)

log = get_logger("models")
T = TypeVar("T")

_DELETE_NOT_FOUND = "error while deleting model: model not found"


@contextmanager
def _disk_full_is_507(action: str) -> Iterator[None]:
    """A full disk is for the client to know about (507), not an internal error (500)."""
    try:
        yield
    except OSError as exc:
        if not space.is_disk_full(exc):
            raise
        raise errors.InsufficientStorage(
            f"error while {action} model: no space left on the disk"
        ) from None


def _invalid_reference(exc: reference.InvalidReference) -> errors.BadRequest:
    return errors.BadRequest(f"Invalid model reference: {exc}")


class ModelService:
    def __init__(self, store: ModelStore) -> None:
        self.store = store

    # -- lookups --------------------------------------------------------------------------
    def _resolve(self, ref: str, not_found: errors.NotFound | None = None) -> IndexEntry:
        try:
            return self.store.resolve(ref)
        except reference.InvalidReference as exc:
            raise _invalid_reference(exc) from None
        except ModelNotFound:
            raise not_found or errors.NotFound("model not found") from None

    def _resolve_with_partial_name(self, ref: str) -> IndexEntry:
        """GET /models/{ref} and tag also accept a bare repository name (spec 3.3)."""
        try:
            return self.store.resolve(ref)
        except (ModelNotFound, reference.InvalidReference) as exc:
            entry = self.store.find_by_partial_name(ref.strip())
            if entry is not None:
                return entry
            if isinstance(exc, reference.InvalidReference):
                raise _invalid_reference(exc) from None
            raise errors.NotFound("model not found") from None

    def _describe(self, entry: IndexEntry) -> dict[str, Any]:
        return model_json(entry, self.store.config(entry))

    @in_thread
    def list_models(self) -> list[dict[str, Any]]:
        return [view for _, view in self.views(model_json)]

    def views(
        self,
        render: Callable[[IndexEntry, dict[str, Any]], T],
        entries: Iterable[IndexEntry] | None = None,
    ) -> Iterator[tuple[IndexEntry, T]]:
        """Each model (every stored one, or ``entries``) rendered from its config, those that
        cannot be read left out. Blocking: for worker threads."""
        for entry in self.store.entries() if entries is None else entries:
            try:
                yield entry, render(entry, self.store.config(entry))
            except (OSError, ValueError, StoreError) as exc:
                # One damaged model must not hide the others (DMR skips it the same way).
                log.warning("skipping unreadable model", model=entry.id, error=str(exc))

    @in_thread
    def get_model(self, ref: str) -> dict[str, Any]:
        return self._describe(self._resolve_with_partial_name(ref))

    @in_thread
    def openai_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [view for _, view in self.views(openai_json)]}

    @in_thread
    def openai_model(self, ref: str) -> dict[str, Any]:
        entry = self._resolve(ref, errors.model_not_found(ref))
        return openai_json(entry, self.store.config(entry))

    # -- changes --------------------------------------------------------------------------
    @in_thread
    @_disk_full_is_507("deleting")
    def delete_model(self, ref: str, force: bool) -> list[dict[str, str]]:
        entry = self._resolve(ref, errors.NotFound(_DELETE_NOT_FOUND))
        text = ref.strip()
        try:
            if not reference.looks_like_id(text) and "@" not in text:
                canonical = str(self.store.parse_reference(text))
                stored, deleted = self.store.untag(entry.id, canonical)
                if deleted is None:
                    return [{"Untagged": stored}]
                return [{"Untagged": stored}, {"Deleted": deleted.id}]
            deleted = self.store.delete(entry.id, force=force)
        except MultipleTags:
            raise errors.Conflict(
                f'error while deleting model: unable to delete "{text}" (must be forced) '
                "due to multiple tag references: resource conflict"
            ) from None
        except ModelNotFound:
            raise errors.NotFound(_DELETE_NOT_FOUND) from None
        return [*({"Untagged": t} for t in deleted.tags), {"Deleted": deleted.id}]

    @in_thread
    @_disk_full_is_507("tagging")
    def tag_model(self, ref: str, repo: str, tag: str) -> dict[str, str]:
        if not repo or not tag:
            raise errors.BadRequest("missing repo or tag query parameter")
        target = f"{repo}:{tag}"
        try:
            canonical = str(self.store.parse_reference(target))
        except reference.InvalidReference as exc:
            raise _invalid_reference(exc) from None
        entry = self._resolve_with_partial_name(ref)
        try:
            self.store.tag(entry.id, canonical)
        except ModelNotFound:
            raise errors.NotFound("model not found") from None
        return {"message": f'Model tagged successfully with "{target}"', "target": target}

    @in_thread
    def purge(self) -> None:
        self.store.purge()

    @in_thread
    @_disk_full_is_507("loading")
    def load(self, stream: BinaryIO) -> tuple[IndexEntry, dict[str, Any]]:
        """Import a model tarball; the entry is untagged, as in DMR (the client tags it).

        ``stream`` is a blocking reader (the request body bridged to this worker thread).
        """
        try:
            entry = importer.import_tar(self.store, stream)
        except UnsupportedConfig as exc:
            raise errors.Unsupported(str(exc)) from None
        except (importer.InvalidArchive, InvalidManifest) as exc:
            raise errors.BadRequest(f"error while loading model: {exc}") from None
        except space.InsufficientStorage as exc:
            raise errors.InsufficientStorage(f"error while loading model: {exc}") from None
        log.info("model loaded", model=entry.id)
        return entry, progress.message("success", "Model loaded successfully")

    @in_thread
    def export(self, ref: str) -> tuple[str, Generator[bytes, None, None]]:
        """The tarball of a model, as a file name and a lazy chunk iterator whose chunks read
        the disk: pull them off the event loop (``app.api.streams.write_chunks`` does).

        Every blob is opened before the first byte goes out, so a missing file is an error
        status rather than a cut stream, and a delete during the export cannot truncate it.
        """
        entry = self._resolve(ref)
        manifest = self.store.manifest(entry)
        raw = self.store.manifest_bytes(entry)
        files: list[BinaryIO] = []
        try:
            for d in manifest.blobs:
                files.append(open(self.store.blob_path(d.digest), "rb"))  # noqa: SIM115
        except OSError as exc:
            for f in files:
                f.close()
            raise errors.ServiceError(f"error while exporting model: {exc}") from None
        blobs = [BlobSource(d, _opened(f)) for d, f in zip(manifest.blobs, files, strict=True)]
        return f"{ref}.tar", _closing_after(iter_tar(blobs, raw), files)


def _opened(f: BinaryIO) -> Callable[[], BinaryIO]:
    return lambda: f


def _closing_after(chunks: Iterator[bytes], files: list[BinaryIO]) -> Generator[bytes, None, None]:
    try:
        yield from chunks
    finally:
        for f in files:
            f.close()
