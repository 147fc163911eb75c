"""JSON shapes of models as DMR's API returns them (spec 3.2 and 6.1)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from app.store import IndexEntry

# ModelPack (CNCF) configs keep these facts in other places; DMR projects them onto its own names.
_CNCF_FIELDS = {"format": "format", "paramSize": "parameters", "quantization": "quantization"}


def model_json(entry: IndexEntry, config_doc: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"id": entry.id}
    if entry.tags:
        out["tags"] = list(entry.tags)
    out["created"] = created_seconds(config_doc)
    out["config"] = model_config(config_doc)
    return out


def openai_json(entry: IndexEntry, config_doc: dict[str, Any]) -> dict[str, Any]:
    config = model_config(config_doc)
    dmr = {
        "context_window": config.get("context_size"),
        "architecture": config.get("architecture"),
        "parameters": config.get("parameters"),
        "quantization": config.get("quantization"),
        "size": config.get("size"),
    }
    return {
        "id": entry.name,
        "object": "model",
        "created": created_seconds(config_doc),
        "owned_by": "docker",
        "dmr": {k: v for k, v in dmr.items() if v},
    }


def model_config(config_doc: dict[str, Any]) -> dict[str, Any]:
    config = config_doc.get("config")
    if not isinstance(config, dict):
        return {}
    if "format" in config or "gguf" in config:
        return config
    return {ours: config[theirs] for theirs, ours in _CNCF_FIELDS.items() if theirs in config}


def created_seconds(config_doc: dict[str, Any]) -> int:
    descriptor = config_doc.get("descriptor") or {}
    stamp = descriptor.get("created") or descriptor.get("createdAt")
    if not isinstance(stamp, str):
        return 0
    try:
        return int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0
