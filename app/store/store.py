"""Content-addressed model store in DMR's layout (spec 8.3), safe under crashes and concurrency.

Blobs and manifests are immutable files named by their sha256. ``models.json`` is the commit
point: a model exists once its index entry is written, and an entry is written only after every
blob it names is on disk and verified. Index updates hold a thread lock and an ``flock`` so that
the service and a ``package --store`` process can share one store.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.oci import reference
from app.oci.manifest import Manifest, parse_manifest
from app.store import bundle as bundle_mod
from app.store.atomic import AtomicFile, remove_abandoned, write_atomic
from app.store.bundle import Bundle
from app.store.partial import SUFFIX, PartialBlob, demote, remove_stale

LAYOUT_VERSION = "1.0.0"
# What a store holds at its top level; purge removes these and nothing else.
_STORE_NAMES = ("layout.json", "models.json", "blobs", "manifests", "bundles")
_HEX = re.compile(r"^[0-9a-f]{64}$")
# A blob no model names is garbage, unless it is younger than this: another process (``package
# --store``) writes a model's blobs before it commits the model, and its pins are not ours.
ORPHAN_GRACE_S = 3600


class StoreError(Exception):
    """The store cannot do what was asked; the message says why."""


class ModelNotFound(StoreError):
    def __init__(self, message: str = "model not found") -> None:
        super().__init__(message)


class DigestMismatch(StoreError):
    pass


class MultipleTags(StoreError):
    """Deleting by ID a model that several tags name needs force."""


@dataclass(frozen=True)
class IndexEntry:
    id: str
    tags: tuple[str, ...]
    files: tuple[str, ...]

    @property
    def hex(self) -> str:
        return self.id.removeprefix("sha256:")

    @property
    def name(self) -> str:
        """The one spelling the API shows: its first tag (DMR's ``/v1/models`` id), else its ID."""
        return self.tags[0] if self.tags else self.id

    def has_tag(self, canonical: str) -> bool:
        return self.stored_tag(canonical) is not None

    def stored_tag(self, canonical: str) -> str | None:
        """The tag as stored (spellings vary across DMR versions) that means ``canonical``."""
        return next((tag for tag in self.tags if _canonical_tag(tag) == canonical), None)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "tags": list(self.tags), "files": list(self.files)}


def _canonical_tag(tag: str) -> str | None:
    """Older DMR builds stored tags as typed (``ai/x:latest``); compare them normalized."""
    try:
        return str(reference.parse(tag))
    except reference.InvalidReference:
        return None


class BlobWriter(AtomicFile):
    """Writes one blob; it becomes visible only if its bytes hash to the expected digest."""

    def __init__(self, path: Path, expected: str) -> None:
        super().__init__(path)
        self.expected = expected

    def commit(self) -> None:
        if self.digest != self.expected:
            raise DigestMismatch(
                f"blob digest mismatch: expected {self.expected}, got {self.digest}"
            )
        super().commit()


class ModelStore:
    def __init__(self, root: Path, default_registry: str = reference.DEFAULT_REGISTRY) -> None:
        self.root = root
        self.default_registry = default_registry
        self.blobs_dir = root / "blobs" / "sha256"
        self.manifests_dir = root / "manifests" / "sha256"
        self.bundles_dir = root / "bundles" / "sha256"
        self._index_path = root / "models.json"
        self._lock = threading.RLock()
        self._pins: Counter[str] = Counter()
        self._init_layout()

    # -- set-up ---------------------------------------------------------------------------
    def _init_layout(self) -> None:
        is_store = any((self.root / n).exists() for n in _STORE_NAMES)
        foreign = self.root.is_dir() and any(p.name != ".lock" for p in self.root.iterdir())
        if foreign and not is_store:
            raise StoreError(f"{self.root} is not empty and does not hold a model store")
        for d in (self.blobs_dir, self.manifests_dir, self.bundles_dir):
            d.mkdir(parents=True, exist_ok=True)
        layout = self.root / "layout.json"
        if not layout.exists():
            write_atomic(layout, json.dumps({"version": LAYOUT_VERSION}).encode())
        if not self._index_path.exists():
            self._write_index([])
        # Temp files are what a crash leaves behind mid-write; nothing refers to them. Partial
        # downloads are kept for resuming, unless nobody came back for them in a week.
        for d in (self.root, self.blobs_dir, self.manifests_dir):
            remove_abandoned(d)
        bundle_mod.remove_abandoned(self.bundles_dir)
        remove_stale(self.blobs_dir)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock, open(self.root / ".lock", "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    # -- index ----------------------------------------------------------------------------
    def entries(self) -> list[IndexEntry]:
        try:
            doc = json.loads(self._index_path.read_bytes())
        except FileNotFoundError:
            return []
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StoreError(f"{self._index_path} is corrupt: {exc}") from None
        return [
            IndexEntry(
                id=item["id"],
                tags=tuple(item.get("tags") or ()),
                files=tuple(item.get("files") or ()),
            )
            for item in doc.get("models") or []
        ]

    def _write_index(self, entries: Iterable[IndexEntry]) -> None:
        doc = {"models": [e.to_json() for e in entries]}
        write_atomic(self._index_path, json.dumps(doc, indent=2).encode())

    def get(self, model_id: str) -> IndexEntry:
        for entry in self.entries():
            if entry.id == model_id:
                return entry
        raise ModelNotFound()

    def resolve(self, ref: str) -> IndexEntry:
        """Find a model by tag in any spelling, ID, short ID or ``name@digest`` (spec 4.2).

        Raises InvalidReference for text that is neither an ID nor a reference.
        """
        text = ref.strip()
        entries = self.entries()
        if reference.looks_like_id(text):
            full = text if text.startswith("sha256:") else None
            for entry in entries:
                if full == entry.id or text in (entry.hex, entry.hex[:12]):
                    return entry
        parsed = self.parse_reference(text)
        if parsed.digest:
            for entry in entries:
                if entry.id == parsed.digest:
                    return entry
            raise ModelNotFound()
        canonical = str(parsed)
        for entry in entries:
            if entry.has_tag(canonical):
                return entry
        raise ModelNotFound()

    def parse_reference(self, text: str) -> reference.Reference:
        """Parse a user's reference with this store's default registry."""
        return reference.parse(text, self.default_registry)

    def find_by_partial_name(self, name: str) -> IndexEntry | None:
        """DMR's fallback: a tag whose last path component, less its ``:tag``, equals ``name``."""
        for entry in self.entries():
            for tag in entry.tags:
                last = tag.rsplit("/", 1)[-1]
                if last.rsplit(":", 1)[0] == name:
                    return entry
        return None

    # -- blobs and manifests --------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        algo, _, hex_ = digest.partition(":")
        if algo != "sha256" or not _HEX.match(hex_):
            raise StoreError(f"invalid digest {digest!r}")
        return self.blobs_dir / hex_

    def has_blob(self, digest: str, size: int | None = None) -> bool:
        try:
            st = self.blob_path(digest).stat()
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def blob_writer(self, digest: str) -> BlobWriter:
        return BlobWriter(self.blob_path(digest), digest)

    def partial_blob(self, digest: str, size: int) -> PartialBlob:
        """Open (or resume) a download of a blob; see app.store.partial."""
        return PartialBlob(self.blob_path(digest), digest, size)

    def partial_size(self, digest: str) -> int:
        """Bytes a resumable download of this blob already has on disk."""
        path = self.blob_path(digest)
        try:
            return path.with_name(path.name + SUFFIX).stat().st_size
        except FileNotFoundError:
            return 0

    def manifest_bytes(self, entry: IndexEntry) -> bytes:
        return (self.manifests_dir / entry.hex).read_bytes()

    def manifest(self, entry: IndexEntry) -> Manifest:
        return parse_manifest(self.manifest_bytes(entry))

    def config(self, entry: IndexEntry) -> dict[str, Any]:
        raw = self.blob_path(self.manifest(entry).config.digest).read_bytes()
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise StoreError(f"config of {entry.id} is not a JSON object")
        return doc

    def bundle(self, entry: IndexEntry) -> Bundle:
        """The model's runtime bundle, built on first use (a runner starts from it)."""
        manifest = self.manifest(entry)
        files = bundle_mod.layout(manifest)
        bundle_mod.first_weights(files)  # no weights, no bundle
        config = self.config(entry).get("config") or {}
        root = self.bundles_dir / entry.hex
        bundle_mod.build(root, {rel: self.blob_path(d) for rel, d in files.items()}, config)
        return bundle_mod.describe(root, files, config)

    # -- changes --------------------------------------------------------------------------
    def add_model(self, manifest_raw: bytes, tags: Iterable[str] = ()) -> IndexEntry:
        """Commit a model whose blobs are all stored; returns its (new or existing) entry."""
        manifest = parse_manifest(manifest_raw)
        model_id = "sha256:" + hashlib.sha256(manifest_raw).hexdigest()
        with self._locked():
            for blob in manifest.blobs:
                if not self.has_blob(blob.digest, blob.size):
                    raise StoreError(f"blob {blob.digest} ({blob.size} bytes) is not in the store")
            manifest_path = self.manifests_dir / model_id.removeprefix("sha256:")
            if not manifest_path.exists():
                write_atomic(manifest_path, manifest_raw)
            entries = self.entries()
            if not any(e.id == model_id for e in entries):
                files = tuple(b.digest for b in manifest.blobs)
                entries.append(IndexEntry(id=model_id, tags=(), files=files))
            entries = _retag(entries, model_id, list(tags))
            self._write_index(entries)
            return next(e for e in entries if e.id == model_id)

    def tag(self, model_id: str, tag: str) -> None:
        """Point ``tag`` (canonical spelling) at the model, moving it off any other model."""
        with self._locked():
            entries = self.entries()
            if not any(e.id == model_id for e in entries):
                raise ModelNotFound()
            self._write_index(_retag(entries, model_id, [tag]))

    def untag(self, model_id: str, canonical: str) -> tuple[str, IndexEntry | None]:
        """Remove one tag; the model goes too when it was its last tag (DMR's DELETE by name).

        Returns the tag as it was stored and, when the model was deleted, its entry. Decided
        under the lock, so two requests removing a model's two tags cannot leave it tagless.
        """
        with self._locked():
            entry = self.get(model_id)
            stored = entry.stored_tag(canonical)
            if stored is None:
                raise ModelNotFound()
            if len(entry.tags) == 1:
                return stored, self._delete_locked(model_id)
            kept = tuple(t for t in entry.tags if t != stored)
            self._replace(IndexEntry(entry.id, kept, entry.files))
            return stored, None

    def delete(self, model_id: str, force: bool = True) -> IndexEntry:
        """Remove a model; blobs shared with other models stay. Returns the removed entry.

        Without ``force`` a model with several tags is refused (DMR's rule for deleting by ID).
        """
        with self._locked():
            if not force and len(self.get(model_id).tags) > 1:
                raise MultipleTags()
            return self._delete_locked(model_id)

    def _replace(self, entry: IndexEntry) -> None:
        self._write_index([entry if e.id == entry.id else e for e in self.entries()])

    def _delete_locked(self, model_id: str) -> IndexEntry:
        entries = self.entries()
        doomed = next((e for e in entries if e.id == model_id), None)
        if doomed is None:
            raise ModelNotFound()
        rest = [e for e in entries if e.id != model_id]
        self._write_index(rest)  # commit point: from here the model is gone
        shutil.rmtree(self.bundles_dir / doomed.hex, ignore_errors=True)
        (self.manifests_dir / doomed.hex).unlink(missing_ok=True)
        # Besides the model's own blobs, any that crashes or older builds left unreferenced.
        for digest in self._unused([*doomed.files, *self._orphans()], rest):
            self.blob_path(digest).unlink(missing_ok=True)
        return doomed

    def _unused(self, digests: Iterable[str], entries: list[IndexEntry]) -> list[str]:
        """Those of ``digests`` no model uses and no import or pull in progress counts on."""
        used = {f for e in entries for f in e.files} | set(self._pins)
        return [d for d in dict.fromkeys(digests) if d not in used]

    def _orphans(self) -> list[str]:
        cutoff = time.time() - ORPHAN_GRACE_S
        found = []
        for path in self.blobs_dir.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if _HEX.match(path.name) and path.stat().st_mtime < cutoff:
                    found.append("sha256:" + path.name)
        return found

    def discard_blobs(self, digests: Iterable[str], resumable: bool = False) -> None:
        """Drop blobs an aborted import or pull wrote, unless a committed model or a pin uses
        them; ``resumable`` turns each back into a partial download for the next pull instead."""
        with self._locked():
            for digest in self._unused(digests, self.entries()):
                path = self.blob_path(digest)
                if resumable:
                    demote(path)
                else:
                    path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def pinned(self, digests: Iterable[str]) -> Iterator[None]:
        """Keep these blobs from being deleted while an import or pull relies on them."""
        wanted = list(digests)
        with self._lock:
            self._pins.update(wanted)
        try:
            yield
        finally:
            with self._lock:
                self._pins.subtract(wanted)
                self._pins += Counter()  # drop the zero counts

    def purge(self) -> None:
        with self._locked():
            for name in _STORE_NAMES:
                child = self.root / name
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink(missing_ok=True)
            self._init_layout()


def _retag(entries: list[IndexEntry], model_id: str, tags: list[str]) -> list[IndexEntry]:
    """Add ``tags`` to ``model_id`` and remove them from every other entry (tags are unique)."""
    if not tags:
        return entries
    wanted = {_canonical_tag(t) for t in tags}
    out = []
    for e in entries:
        kept = tuple(t for t in e.tags if _canonical_tag(t) not in wanted)
        if e.id == model_id:
            kept += tuple(tags)
        out.append(IndexEntry(e.id, kept, e.files))
    return out
