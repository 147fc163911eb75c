"""Model references, normalized the way Docker Model Runner does it (spec section 4).

``smollm2``, ``ai/smollm2``, ``ai/smollm2:latest`` and ``docker.io/ai/smollm2:latest`` are one
model; the canonical spelling, which is also what the store writes as a tag, is the last one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_REGISTRY = "docker.io"
DEFAULT_NAMESPACE = "ai"
DEFAULT_TAG = "latest"

# The grammar of github.com/distribution/reference, which Docker uses.
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DOMAIN = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"(?::[0-9]+)?$"
)
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX12 = re.compile(r"^[0-9a-f]{12}$")
_MAX_NAME = 255
_REGISTRY_ALIASES = {"index.docker.io": DEFAULT_REGISTRY, "registry-1.docker.io": DEFAULT_REGISTRY}
_HOST_ALIASES = {"hf.co": "huggingface.co"}


class InvalidReference(ValueError):
    """The text is not a model reference."""


@dataclass(frozen=True)
class Reference:
    registry: str
    repository: str
    tag: str = DEFAULT_TAG
    digest: str | None = None

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        if self.digest:
            return f"{self.name}@{self.digest}"
        return f"{self.name}:{self.tag}"

    @property
    def familiar(self) -> str:
        """The short spelling people type: ``ai/smollm2:latest`` rather than ``docker.io/...``."""
        if self.registry == DEFAULT_REGISTRY:
            return str(self)[len(DEFAULT_REGISTRY) + 1 :]
        return str(self)


def looks_like_id(text: str) -> bool:
    """True for a model ID spelling: 12 or 64 lowercase hex digits, or ``sha256:<64 hex>``."""
    return bool(_HEX12.match(text) or _HEX64.match(text) or _DIGEST.match(text))


def parse(text: str, default_registry: str = DEFAULT_REGISTRY) -> Reference:
    """Parse and normalize a user's reference; raise InvalidReference with the reason."""
    ref = text.strip()
    if not ref:
        raise InvalidReference("empty reference")
    if any(ord(c) < 0x20 or ord(c) == 0x7F or c.isspace() for c in ref):
        raise InvalidReference("reference contains whitespace or control characters")
    digest = None
    if "@" in ref:
        ref, digest = ref.split("@", 1)
        if not _DIGEST.match(digest):
            raise InvalidReference(f"invalid digest {digest!r}")
    name, tag = ref, DEFAULT_TAG
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        name, tag = ref[:colon], ref[colon + 1 :] or DEFAULT_TAG
    if not _TAG.match(tag):
        raise InvalidReference(f"invalid tag {tag!r}")
    parts = name.split("/")
    if len(parts) > 1 and _is_registry(parts[0]):
        registry = parts[0].lower()
        registry = _HOST_ALIASES.get(registry, _REGISTRY_ALIASES.get(registry, registry))
        if not _DOMAIN.match(registry):
            raise InvalidReference(f"invalid registry {parts[0]!r}")
        path = parts[1:]
    else:
        registry = default_registry
        path = parts
    path = [p.lower() for p in path]
    # DMR puts one-word names in the "ai" namespace where Docker would use "library".
    if len(path) == 1 and registry in (default_registry, DEFAULT_REGISTRY):
        path = [DEFAULT_NAMESPACE, *path]
    for component in path:
        if not _COMPONENT.match(component):
            raise InvalidReference(f"invalid repository name component {component!r}")
    repository = "/".join(path)
    if len(registry) + 1 + len(repository) > _MAX_NAME:
        raise InvalidReference("repository name is too long")
    return Reference(registry=registry, repository=repository, tag=tag, digest=digest)


def _is_registry(component: str) -> bool:
    return "." in component or ":" in component or component.lower() == "localhost"
