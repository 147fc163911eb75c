"""The ``config`` object of a DMR artifact, read from a GGUF file's header (spec 3.2 and 8.2)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from app import gguf_header

# DMR leaves long arrays (vocabularies, merges) out of the metadata map.
_MAX_ARRAY = 50
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")


class GGUFError(ValueError):
    """The file is not a GGUF model this tool can read."""


def discover_shards(first: Path) -> list[Path]:
    """All shards of a split GGUF given its first shard, in order; ``[first]`` if not split."""
    m = _SHARD.match(first.name)
    if not m:
        return [first]
    if int(m["index"]) != 1:
        raise GGUFError(f"{first}: point --gguf at the first shard (-00001-of-{m['count']})")
    count = int(m["count"])
    shards = [
        first.with_name(f"{m['stem']}-{i:05d}-of-{m['count']}.gguf") for i in range(1, count + 1)
    ]
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise GGUFError(f"missing GGUF shards: {', '.join(missing)}")
    return shards


def extract_config(shards: list[Path], context_size: int | None = None) -> dict[str, Any]:
    """Build the artifact's ``config`` object: format, quantization, parameters, sizes, KVs."""
    headers = [_header(p) for p in shards]
    meta = {key: _stringify(value) for key, value in headers[0].metadata.items()}
    arch = meta.get("general.architecture", "")
    tensors = [t for h in headers for t in h.tensors]
    config: dict[str, Any] = {
        "format": "gguf",
        "quantization": _quantization(headers[0].metadata.get("general.file_type"), tensors),
        "parameters": _scaled(sum(t.n_elements for t in tensors), 1000, ["", "K", "M", "B", "T"]),
        "architecture": arch,
        "size": _scaled(
            sum(p.stat().st_size for p in shards), 1024, ["B", "KiB", "MiB", "GiB", "TiB"]
        ),
        "gguf": meta,
    }
    if context_size is None:
        trained = meta.get(f"{arch}.context_length", "")
        context_size = int(trained) if trained.isdigit() else None
    if context_size:
        config["context_size"] = context_size
    return config


def _header(path: Path) -> gguf_header.Header:
    try:
        return gguf_header.read_header(path, max_array_items=_MAX_ARRAY)
    except FileNotFoundError:
        raise GGUFError(f"{path}: no such file") from None
    except (OSError, gguf_header.HeaderError) as exc:
        raise GGUFError(f"{path}: not a readable GGUF file ({exc})") from None


def _stringify(value: Any) -> str:
    # Go's %v and %f, which DMR uses for this map.
    if isinstance(value, list):
        return ", ".join(_stringify(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:f}"
    return str(value)


def _quantization(file_type: Any, tensors: list[gguf_header.Tensor]) -> str:
    if isinstance(file_type, int) and file_type in gguf_header.FILE_TYPES:
        return gguf_header.FILE_TYPES[file_type]
    if not tensors:
        return ""
    return Counter(t.type_name for t in tensors).most_common(1)[0][0]


def _scaled(value: float, base: int, units: list[str]) -> str:
    i = 0
    while value >= base and i < len(units) - 1:
        value /= base
        i += 1
    return f"{value:.2f}{units[i]}"
