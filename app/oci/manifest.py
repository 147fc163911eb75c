"""The OCI manifest and config of a Docker model artifact (spec section 8)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_V01 = "application/vnd.docker.ai.model.config.v0.1+json"
CONFIG_V02 = "application/vnd.docker.ai.model.config.v0.2+json"
CONFIG_CNCF_V1 = "application/vnd.cncf.model.config.v1+json"
SUPPORTED_CONFIG_TYPES = (CONFIG_V01, CONFIG_V02, CONFIG_CNCF_V1)

GGUF = "application/vnd.docker.ai.gguf.v3"
LICENSE = "application/vnd.docker.ai.license"
MMPROJ = "application/vnd.docker.ai.mmproj"
CHAT_TEMPLATE = "application/vnd.docker.ai.chat.template.jinja"

ANNOTATION_FILEPATH = "org.cncf.model.filepath"
ANNOTATION_FILE_METADATA = "org.cncf.model.file.metadata+json"
ANNOTATION_UNTESTED = "org.cncf.model.file.mediatype.untested"

# A manifest lists a handful of layers; anything this large is not one.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class InvalidManifest(ValueError):
    """The bytes are not a model manifest this service can store."""


class UnsupportedConfig(InvalidManifest):
    """The artifact is a model of a kind (config media type) this service cannot run."""

    def __init__(self, media_type: str) -> None:
        super().__init__(
            f'config type "{media_type}" is not supported (supported: '
            f"{', '.join(SUPPORTED_CONFIG_TYPES)}) - try upgrading: "
            "unsupported model config media type"
        )
        self.media_type = media_type


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "size": self.size,
            "digest": self.digest,
        }
        if self.annotations:
            out["annotations"] = self.annotations
        return out


@dataclass(frozen=True)
class Manifest:
    config: Descriptor
    layers: tuple[Descriptor, ...]

    @property
    def blobs(self) -> tuple[Descriptor, ...]:
        """Every blob the model needs, in the order DMR's index lists them: layers, then config."""
        return (*self.layers, self.config)

    def to_json(self) -> dict[str, Any]:
        return {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": self.config.to_json(),
            "layers": [layer.to_json() for layer in self.layers],
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":")).encode()


def parse_manifest(raw: bytes) -> Manifest:
    """Validate a raw manifest; raise InvalidManifest (or UnsupportedConfig) saying why."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise InvalidManifest("manifest is too large")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidManifest(f"manifest is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
        raise InvalidManifest("manifest is not an OCI image manifest (schemaVersion 2)")
    layers = doc.get("layers")
    if not isinstance(layers, list) or not layers:
        raise InvalidManifest("manifest has no layers")
    config = _descriptor(doc.get("config"), "config")
    if config.media_type not in SUPPORTED_CONFIG_TYPES:
        raise UnsupportedConfig(config.media_type)
    return Manifest(
        config=config,
        layers=tuple(_descriptor(layer, f"layers[{i}]") for i, layer in enumerate(layers)),
    )


def parse_config(raw: bytes) -> dict[str, Any]:
    """A model config blob must be a JSON object (its ``config`` member describes the model)."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidManifest("the model config is not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("config", {}), dict):
        raise InvalidManifest("the model config is not a JSON object with a config object")
    return doc


def _descriptor(value: Any, where: str) -> Descriptor:
    if not isinstance(value, dict):
        raise InvalidManifest(f"manifest {where} is not an object")
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise InvalidManifest(f"manifest {where} has no mediaType")
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise InvalidManifest(f"manifest {where} has an invalid digest {digest!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidManifest(f"manifest {where} has an invalid size")
    annotations = value.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
    ):
        raise InvalidManifest(f"manifest {where} has invalid annotations")
    return Descriptor(media_type=media_type, digest=digest, size=size, annotations=annotations)
