"""Assemble a DMR-format model artifact (spec 8.1, 8.2) from a GGUF and optional extras."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from app.oci import manifest as mt
from app.oci.blobs import BlobSource, file_source
from app.oci.manifest import CONFIG_V01, Descriptor, Manifest
from app.oci.tarball import CHUNK
from app.packaging.gguf_config import discover_shards, extract_config
from app.store import IndexEntry, ModelStore


@dataclass(frozen=True)
class LayerFile:
    descriptor: Descriptor
    path: Path


@dataclass(frozen=True)
class Artifact:
    manifest: bytes
    config: bytes
    layers: tuple[LayerFile, ...]

    @property
    def id(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()

    @property
    def config_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.config).hexdigest()

    def blob_sources(self) -> list[BlobSource]:
        """Every blob (layers, then config) with a way to read it."""
        config = self.config
        config_desc = Descriptor(CONFIG_V01, self.config_digest, len(config))
        layers = [file_source(lf.descriptor, lf.path) for lf in self.layers]
        return [*layers, BlobSource(config_desc, lambda: io.BytesIO(config))]


def build(
    gguf_path: Path,
    licenses: Sequence[Path] = (),
    chat_template: Path | None = None,
    context_size: int | None = None,
    mmproj: Path | None = None,
    created: datetime | None = None,
) -> Artifact:
    shards = discover_shards(gguf_path)
    layers = [_layer(p, mt.GGUF) for p in shards]
    layers += [_layer(p, mt.LICENSE) for p in licenses]
    if chat_template is not None:
        layers.append(_layer(chat_template, mt.CHAT_TEMPLATE))
    if mmproj is not None:
        layers.append(_layer(mmproj, mt.MMPROJ))
    created = created or datetime.now(UTC)
    config_doc = {
        "config": extract_config(shards, context_size),
        "descriptor": {"created": created.strftime("%Y-%m-%dT%H:%M:%SZ")},
        "rootfs": {"type": "rootfs", "diff_ids": [lf.descriptor.digest for lf in layers]},
    }
    config = json.dumps(config_doc, separators=(",", ":")).encode()
    config_desc = Descriptor(
        media_type=CONFIG_V01,
        digest="sha256:" + hashlib.sha256(config).hexdigest(),
        size=len(config),
    )
    manifest = Manifest(config=config_desc, layers=tuple(lf.descriptor for lf in layers))
    return Artifact(manifest=manifest.to_bytes(), config=config, layers=tuple(layers))


def _layer(path: Path, media_type: str) -> LayerFile:
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
            size += len(chunk)
    st = path.stat()
    file_meta = {
        "name": path.name,
        "mode": 0o644,
        "uid": 0,
        "gid": 0,
        "size": size,
        "mtime": datetime.fromtimestamp(st.st_mtime, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "typeflag": 0,
    }
    annotations = {
        mt.ANNOTATION_FILEPATH: path.name,
        mt.ANNOTATION_FILE_METADATA: json.dumps(file_meta, separators=(",", ":")),
        mt.ANNOTATION_UNTESTED: "false",
    }
    descriptor = Descriptor(media_type, "sha256:" + sha.hexdigest(), size, annotations)
    return LayerFile(descriptor=descriptor, path=path)


def write_to_store(built: Artifact, store: ModelStore, tag: str) -> IndexEntry:
    """Put an artifact straight into a local store (no service), verifying every blob."""
    for layer in built.layers:
        if store.has_blob(layer.descriptor.digest, layer.descriptor.size):
            continue
        with store.blob_writer(layer.descriptor.digest) as w, open(layer.path, "rb") as f:
            while chunk := f.read(CHUNK):
                w.write(chunk)
            w.commit()
    with store.blob_writer(built.config_digest) as w:
        w.write(built.config)
        w.commit()
    return store.add_model(built.manifest, [tag])
