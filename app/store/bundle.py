"""Runtime bundles (spec 8.3): the files of one model laid out the way a runner reads them.

``bundles/sha256/<id>/model/model.gguf`` (or the shards ``model-0000i-of-0000N.gguf``),
``model.mmproj``, ``template.jinja`` and, for v0.2/ModelPack artifacts, files at their annotated
paths, all hard links to blobs, plus ``config.json``. A runner is always given the first shard.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from app.oci import manifest as mt

_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")
_WEIGHTS = {mt.GGUF, "application/vnd.cncf.model.weight.v1.gguf"}
_GENERIC = {
    "application/vnd.docker.ai.model.file",
    "application/vnd.cncf.model.weight.v1.raw",
    "application/vnd.cncf.model.weight.config.v1.raw",
    "application/vnd.cncf.model.doc.v1.raw",
}


class BundleError(ValueError):
    pass


@dataclass(frozen=True)
class Bundle:
    root: Path
    gguf: Path  # the first shard: llama.cpp finds the others from its name
    shards: tuple[Path, ...]
    mmproj: Path | None
    chat_template: Path | None
    config: dict[str, Any]


def layout(manifest: mt.Manifest) -> dict[str, str]:
    """Bundle-relative path -> blob digest for every file a runner may need."""
    files: dict[str, str] = {}
    weights = [layer for layer in manifest.layers if layer.media_type in _WEIGHTS]
    if len(weights) == 1:
        files["model/model.gguf"] = weights[0].digest
    else:
        n = len(weights)
        for i, layer in enumerate(weights, start=1):
            files[f"model/model-{i:05d}-of-{n:05d}.gguf"] = layer.digest
    for layer in manifest.layers:
        if layer.media_type == mt.MMPROJ:
            files["model/model.mmproj"] = layer.digest
        elif layer.media_type == mt.CHAT_TEMPLATE:
            files["model/template.jinja"] = layer.digest
        elif layer.media_type in _GENERIC and mt.ANNOTATION_FILEPATH in layer.annotations:
            files["model/" + _safe_relative(layer.annotations[mt.ANNOTATION_FILEPATH])] = (
                layer.digest
            )
    return files


def _safe_relative(path: str) -> str:
    """An annotation path from a registry must stay inside the bundle."""
    p = PurePosixPath(path)
    if (
        p.is_absolute()
        or not p.parts
        or any(part in ("..", "") for part in p.parts)
        or "\\" in path
    ):
        raise BundleError(f"unsafe file path in the artifact: {path!r}")
    return str(p)


def build(root: Path, files: dict[str, Path], config: dict[str, Any]) -> None:
    """Create the bundle directory atomically: built beside it, then renamed into place."""
    if root.exists():
        return
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root.parent))
    try:
        for rel, blob in files.items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(blob, target)
            except OSError:  # a filesystem without hard links
                shutil.copyfile(blob, target)
        (tmp / "config.json").write_text(json.dumps(config))
        os.rename(tmp, root)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not root.is_dir():
            raise
        # Another request built the same bundle first; theirs is as good as ours.
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_abandoned(bundles_dir: Path, min_age_s: float = 3600) -> None:
    """Bundles half-built by a process that died; a live build finishes in well under this."""
    now = time.time()
    for tmp in bundles_dir.glob(".tmp-*"):
        with contextlib.suppress(FileNotFoundError):
            if now - tmp.stat().st_mtime > min_age_s:
                shutil.rmtree(tmp, ignore_errors=True)


def first_weights(files: dict[str, str]) -> str:
    """The GGUF llama.cpp is given: the only one, or shard 00001 of a split model."""
    shards = sorted(k for k in files if k == "model/model.gguf" or _SHARD.search(k))
    if not shards:
        raise BundleError("the model has no GGUF weights for llama.cpp")
    return shards[0]


def describe(root: Path, files: dict[str, str], config: dict[str, Any]) -> Bundle:
    return Bundle(
        root=root,
        gguf=root / first_weights(files),
        shards=tuple(root / rel for rel in sorted(files) if _is_weights(rel)),
        mmproj=root / "model/model.mmproj" if "model/model.mmproj" in files else None,
        chat_template=root / "model/template.jinja" if "model/template.jinja" in files else None,
        config=config,
    )


def _is_weights(rel: str) -> bool:
    return rel.startswith("model/model") and rel.endswith(".gguf")
