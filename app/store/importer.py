"""Import a model tarball into the store without trusting it.

The archive is read as a stream (it arrives over HTTP). Every blob is hashed while written and
kept only if it matches its name; the manifest must be valid and name only blobs that are stored;
the index entry comes last. Blobs the manifest does not name are not kept (nothing would ever
delete them). On any failure the blobs this import added are removed again, so a truncated or
hostile upload leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import re
import tarfile
from typing import BinaryIO

from app.oci.manifest import (
    MAX_MANIFEST_BYTES,
    InvalidManifest,
    UnsupportedConfig,
    parse_config,
    parse_manifest,
)
from app.oci.tarball import BLOBS_DIR, CHUNK, MANIFEST_NAME
from app.store import bundle, space
from app.store.store import DigestMismatch, IndexEntry, ModelStore

_BLOB_NAME = re.compile(rf"^{BLOBS_DIR}/([0-9a-f]{{64}})$")
_DIRS = {"blobs", BLOBS_DIR}

# Extended headers (PAX, GNU long names) are read whole into memory by tarfile; ours are tiny.
_MAX_EXTENDED_HEADER = 64 * 1024
_EXTENDED_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses extended headers big enough to exhaust memory (a hostile upload's easy win)."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _EXTENDED_TYPES and self.size > _MAX_EXTENDED_HEADER:
            raise tarfile.HeaderError(f"extended tar header of {self.size} bytes")
        return super()._proc_member(tarfile_)  # type: ignore[misc]


class InvalidArchive(ValueError):
    """The upload is not a model tarball; the message says what is wrong with it."""


def import_tar(store: ModelStore, stream: BinaryIO) -> IndexEntry:
    added: list[str] = []
    try:
        with contextlib.ExitStack() as pins:
            entry = _import(store, stream, added, pins)
    except BaseException:
        store.discard_blobs(added)  # after our own pins are released
        raise
    store.discard_blobs(d for d in added if d not in entry.files)
    with contextlib.suppress(bundle.BundleError):  # not a llama.cpp model: no bundle to make
        store.bundle(entry)
    return entry


def _import(
    store: ModelStore, stream: BinaryIO, added: list[str], pins: contextlib.ExitStack
) -> IndexEntry:
    manifest_raw = _read_members(store, stream, added, pins)
    try:
        manifest = parse_manifest(manifest_raw)
    except UnsupportedConfig:
        raise
    except InvalidManifest as exc:
        raise InvalidArchive(f"invalid manifest.json: {exc}") from None
    try:
        bundle.layout(manifest)
    except bundle.BundleError as exc:
        raise InvalidArchive(str(exc)) from None
    for blob in manifest.blobs:
        if not store.has_blob(blob.digest, blob.size):
            raise InvalidArchive(f"archive lacks blob {blob.digest} named by its manifest")
    try:
        parse_config(store.blob_path(manifest.config.digest).read_bytes())
    except InvalidManifest as exc:
        raise InvalidArchive(str(exc)) from None
    return store.add_model(manifest_raw)


def _read_members(
    store: ModelStore, stream: BinaryIO, added: list[str], pins: contextlib.ExitStack
) -> bytes:
    manifest: bytes | None = None
    named: set[str] | None = None  # once the manifest is read: the blobs worth writing
    try:
        with tarfile.open(fileobj=stream, mode="r|", tarinfo=_BoundedTarInfo) as tar:
            for member in tar:
                name = member.name.removeprefix("./").rstrip("/")
                if member.isdir() and name in _DIRS:
                    continue
                if member.issparse():
                    # Its holes expand on extraction: a few KiB of upload could write GiBs.
                    raise InvalidArchive(f"sparse archive entry {member.name!r} is not accepted")
                if not member.isreg():
                    raise InvalidArchive(f"unexpected archive entry {member.name!r}")
                if name == MANIFEST_NAME:
                    if member.size > MAX_MANIFEST_BYTES:
                        raise InvalidArchive("manifest.json is too large")
                    manifest = _read_all(tar, member)
                    named = _named(manifest)
                    continue
                m = _BLOB_NAME.match(name)
                if not m:
                    raise InvalidArchive(f"unexpected archive entry {member.name!r}")
                digest = "sha256:" + m.group(1)
                if named is not None and digest not in named:
                    continue  # the stream skips past its bytes
                # Kept from deletion by other requests until this import commits or fails.
                pins.enter_context(store.pinned([digest]))
                if _store_blob(store, tar, member, digest):
                    added.append(digest)
    except (tarfile.TarError, EOFError) as exc:
        raise InvalidArchive(f"invalid or truncated tar archive: {exc}") from None
    if manifest is None:
        raise InvalidArchive("archive has no manifest.json")
    return manifest


def _named(manifest_raw: bytes) -> set[str] | None:
    """The blobs a manifest names; None when it is invalid (that is reported once all is read)."""
    try:
        return {d.digest for d in parse_manifest(manifest_raw).blobs}
    except InvalidManifest:
        return None


def _read_all(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(member)
    assert f is not None  # a regular file always has content
    data = f.read()
    if len(data) != member.size:
        raise InvalidArchive(f"truncated archive entry {member.name!r}")
    return data


def _store_blob(
    store: ModelStore, tar: tarfile.TarFile, member: tarfile.TarInfo, digest: str
) -> bool:
    """Write one blob, verified; returns False when the store already had it."""
    f = tar.extractfile(member)
    assert f is not None
    if store.has_blob(digest, member.size):
        while f.read(CHUNK):  # a stream archive cannot seek past it
            pass
        return False
    space.check_free_space(store.blobs_dir, member.size, f"blob {digest}")
    with store.blob_writer(digest) as w:
        while chunk := f.read(CHUNK):
            w.write(chunk)
        if w.size != member.size:
            raise InvalidArchive(f"truncated archive entry {member.name!r}")
        try:
            w.commit()
        except DigestMismatch as exc:
            raise InvalidArchive(f"{member.name}: {exc}") from None
    return True
