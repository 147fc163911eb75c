"""Model management: the behaviour of DMR's models handler (spec 3.2-3.6, 3.8, 6.1).

Plain functions over the store; the HTTP layer runs them in a worker thread because they touch
the disk.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, BinaryIO

from app import errors
from app.distribution import progress, reference
from app.distribution.blobs import file_source
from app.distribution.manifest import InvalidManifest, UnsupportedConfig
from app.distribution.tarball import iter_tar
from app.logging import get_logger
from app.service.views import model_json, openai_json
from app.store import IndexEntry, ModelNotFound, ModelStore, StoreError, importer

log = get_logger("models")


class ModelService:
    def __init__(self, store: ModelStore) -> None:
        self.store = store

    # -- lookups --------------------------------------------------------------------------
    def _resolve(self, ref: str, not_found: str = "model not found") -> IndexEntry:
        try:
            return self.store.resolve(ref)
        except reference.InvalidReference as exc:
            raise errors.BadRequest(f"Invalid model reference: {exc}") from None
        except ModelNotFound:
            raise errors.NotFound(not_found) from None

    def _resolve_with_partial_name(self, ref: str) -> IndexEntry:
        """GET /models/{ref} and tag also accept a bare repository name (spec 3.3)."""
        try:
            return self.store.resolve(ref)
        except (ModelNotFound, reference.InvalidReference) as exc:
            entry = self.store.find_by_partial_name(ref.strip())
            if entry is not None:
                return entry
            if isinstance(exc, reference.InvalidReference):
                raise errors.BadRequest(f"Invalid model reference: {exc}") from None
            raise errors.NotFound("model not found") from None

    def _describe(self, entry: IndexEntry) -> dict[str, Any]:
        return model_json(entry, self.store.config(entry))

    def list_models(self) -> list[dict[str, Any]]:
        return [view for entry, view in self._views(model_json)]

    def _views(self, render: Any) -> Iterator[tuple[IndexEntry, dict[str, Any]]]:
        for entry in self.store.entries():
            try:
                yield entry, render(entry, self.store.config(entry))
            except (OSError, ValueError, StoreError) as exc:
                # One damaged model must not hide the others (DMR skips it the same way).
                log.warning("skipping unreadable model", model=entry.id, error=str(exc))

    def get_model(self, ref: str) -> dict[str, Any]:
        return self._describe(self._resolve_with_partial_name(ref))

    def openai_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [view for _, view in self._views(openai_json)]}

    def openai_model(self, ref: str) -> dict[str, Any]:
        entry = self._resolve(
            ref, f"error while getting model: get model '\"{ref}\"': model not found"
        )
        return openai_json(entry, self.store.config(entry))

    # -- changes --------------------------------------------------------------------------
    def delete_model(self, ref: str, force: bool) -> list[dict[str, str]]:
        entry = self._resolve(ref, "error while deleting model: model not found")
        text = ref.strip()
        by_tag = not reference.looks_like_id(text) and "@" not in text
        if by_tag:
            canonical = str(self.store.parse_reference(text))
            stored = entry.stored_tag(canonical) or canonical
            if len(entry.tags) > 1:
                self.store.untag(entry.id, canonical)
                return [{"Untagged": stored}]
            remaining = [stored]
        else:
            if len(entry.tags) > 1 and not force:
                raise errors.Conflict(
                    f'error while deleting model: unable to delete "{text}" (must be forced) '
                    "due to multiple tag references: resource conflict"
                )
            remaining = list(entry.tags)
        try:
            self.store.delete(entry.id)
        except ModelNotFound:
            raise errors.NotFound("error while deleting model: model not found") from None
        return [*({"Untagged": t} for t in remaining), {"Deleted": entry.id}]

    def tag_model(self, ref: str, repo: str, tag: str) -> dict[str, str]:
        if not repo or not tag:
            raise errors.BadRequest("missing repo or tag query parameter")
        target = f"{repo}:{tag}"
        try:
            canonical = str(self.store.parse_reference(target))
        except reference.InvalidReference as exc:
            raise errors.BadRequest(f"Invalid model reference: {exc}") from None
        entry = self._resolve_with_partial_name(ref)
        try:
            self.store.tag(entry.id, canonical)
        except ModelNotFound:
            raise errors.NotFound("model not found") from None
        return {"message": f'Model tagged successfully with "{target}"', "target": target}

    def purge(self) -> None:
        self.store.purge()

    def load(self, stream: BinaryIO) -> tuple[IndexEntry, dict[str, Any]]:
        """Import a model tarball; the entry is untagged, as in DMR (the client tags it)."""
        try:
            entry = importer.import_tar(self.store, stream)
        except UnsupportedConfig as exc:
            raise errors.Unsupported(str(exc)) from None
        except (importer.InvalidArchive, InvalidManifest) as exc:
            raise errors.BadRequest(f"error while loading model: {exc}") from None
        except importer.InsufficientStorage as exc:
            raise errors.InsufficientStorage(f"error while loading model: {exc}") from None
        log.info("model loaded", model=entry.id)
        return entry, progress.message("success", "Model loaded successfully")

    def export(self, ref: str) -> tuple[str, Iterator[bytes]]:
        """The tarball of a model, as a file name and a lazy chunk iterator."""
        entry = self._resolve(ref)
        manifest = self.store.manifest(entry)
        raw = self.store.manifest_bytes(entry)
        blobs = [file_source(d, self.store.blob_path(d.digest)) for d in manifest.blobs]
        return f"{ref}.tar", iter_tar(blobs, raw)
