"""A blob to send somewhere (a tarball, a registry), with a way to read it when its turn comes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from app.oci.manifest import Descriptor


@dataclass(frozen=True)
class BlobSource:
    descriptor: Descriptor
    open: Callable[[], BinaryIO]


def file_source(descriptor: Descriptor, path: Path) -> BlobSource:
    return BlobSource(descriptor, lambda: open(path, "rb"))
