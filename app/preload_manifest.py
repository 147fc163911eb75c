"""The preload manifest: which models to have ready at start-up, and how to run them.

```yaml
models:
  - model: ai/smollm2            # pulled when missing
    context_size: 8192
    keep_alive: -1
    preload: true
    pin: true
  - model: local/embedder:v1     # imported from a file when missing
    gguf: /seed/embedder.gguf
    mode: embedding
```
Any mistake stops start-up with one message naming the file, the line and the problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from app.oci import reference
from app.scheduler.runner_config import (
    MODES,
    ConfigError,
    RunnerConfig,
    checked_keep_alive,
    positive,
)

_FIELDS = (
    "model", "gguf", "mode", "context_size", "keep_alive", "parallel", "gpu_layers",
    "threads", "preload", "pin",
)  # fmt: skip


class ManifestError(ValueError):
    """The manifest is unusable; the message says where and why."""


@dataclass(frozen=True)
class ModelEntry:
    model: str
    config: RunnerConfig
    mode: str = "completion"
    gguf: Path | None = None
    preload: bool = False
    pin: bool = False


def from_list(refs: tuple[str, ...], default_registry: str) -> list[ModelEntry]:
    """MODEL_RUNNER_MODELS: every reference is pulled and preloaded with default settings."""
    for ref in refs:
        try:
            reference.parse(ref, default_registry)
        except reference.InvalidReference as exc:
            raise ManifestError(f"MODEL_RUNNER_MODELS: {ref!r}: {exc}") from None
    return [ModelEntry(model=ref, config=RunnerConfig(), preload=True) for ref in refs]


def load(path: Path, default_registry: str) -> list[ModelEntry]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read it: {exc}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ManifestError(f"{where}: not valid YAML: {problem}") from None
    if root is None:
        return []
    items = root
    if isinstance(root, yaml.MappingNode):
        for key_node, _ in root.value:
            _scalar_key(path, key_node, "the top level")
        keys = {k.value: v for k, v in root.value}
        unknown = set(keys) - {"models"}
        if unknown:
            raise _error(path, root, f"unknown key {sorted(unknown)[0]!r}; expected models")
        items = keys.get("models")
        if items is None or (isinstance(items, yaml.ScalarNode) and items.value in ("", "~")):
            return []
    if not isinstance(items, yaml.SequenceNode):
        raise _error(path, items, "models must be a list of entries")
    entries = [_entry(path, node, i, default_registry) for i, node in enumerate(items.value)]
    seen: dict[tuple[str, str], int] = {}
    for i, entry in enumerate(entries):
        key = (reference.parse(entry.model, default_registry).familiar, entry.mode)
        if key in seen:
            raise _error(
                path,
                items.value[i],
                f"models[{i}]: {entry.model} is listed twice (first as models[{seen[key]}])",
            )
        seen[key] = i
    return entries


def _entry(path: Path, node: yaml.Node, index: int, default_registry: str) -> ModelEntry:
    where = f"models[{index}]"
    if isinstance(node, yaml.ScalarNode):  # a bare reference
        node = yaml.MappingNode("tag:yaml.org,2002:map", [(yaml.ScalarNode("", "model"), node)])
    if not isinstance(node, yaml.MappingNode):
        raise _error(path, node, f"{where}: expected a mapping with at least model:")
    values: dict[str, Any] = {}
    nodes: dict[str, yaml.Node] = {}
    for key_node, value_node in node.value:
        key = _scalar_key(path, key_node, where)
        if key in values:
            raise _error(path, key_node, f"{where}: {key} is given twice")
        if key not in _FIELDS:
            raise _error(
                path,
                key_node,
                f"{where}: unknown key {key!r}; expected one of {', '.join(_FIELDS)}",
            )
        try:
            values[key] = _construct(value_node)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise _error(path, value_node, f"{where}.{key}: {problem}") from None
        nodes[key] = value_node
    try:
        return _build(values, nodes, where, path, node, default_registry)
    except ConfigError as exc:
        raise _error(path, node, f"{where}: {exc}") from None


def _scalar_key(path: Path, node: yaml.Node, where: str) -> str:
    if not isinstance(node, yaml.ScalarNode):
        raise _error(path, node, f"{where}: keys must be plain names")
    return str(node.value)


def _construct(node: yaml.Node) -> Any:
    """A node's Python value, with the same rules as yaml.safe_load."""
    try:
        return yaml.SafeLoader("").construct_object(node, deep=True)
    except (ValueError, TypeError) as exc:  # e.g. `!!int abc`
        raise yaml.YAMLError(f"cannot read the value: {exc}") from None


def _build(
    values: dict[str, Any],
    nodes: dict[str, yaml.Node],
    where: str,
    path: Path,
    node: yaml.Node,
    default_registry: str,
) -> ModelEntry:
    model = values.get("model")
    if not isinstance(model, str) or not model.strip():
        raise _error(path, nodes.get("model", node), f"{where}: model must be a reference")
    try:
        reference.parse(model, default_registry)
    except reference.InvalidReference as exc:
        raise _error(path, nodes["model"], f"{where}.model: {exc}") from None

    def check(key: str, ok: bool, expected: str) -> None:
        if key in values and not ok:
            raise _error(
                path, nodes[key], f"{where}.{key}: expected {expected}, not {values[key]!r}"
            )

    mode = values.get("mode", "completion")
    check("mode", mode in MODES, " or ".join(MODES))
    for flag in ("preload", "pin"):
        check(flag, isinstance(values.get(flag), bool), "true or false")
    gguf = values.get("gguf")
    check("gguf", isinstance(gguf, str) and bool(gguf), "a file path")
    gguf_path = None
    if gguf is not None:
        gguf_path = (path.parent / Path(gguf).expanduser()).resolve()
        if not gguf_path.is_file():
            raise _error(path, nodes["gguf"], f"{where}.gguf: {gguf_path}: no such file")
    fields: dict[str, Any] = {}
    for key in ("context_size", "parallel", "gpu_layers", "threads"):
        if values.get(key) is not None:
            try:
                fields[key] = positive(values[key], key, allow_zero=key == "gpu_layers")
            except ConfigError as exc:
                raise _error(path, nodes[key], f"{where}.{key}: {exc}") from None
    if values.get("keep_alive") is not None:
        try:
            fields["keep_alive"] = checked_keep_alive(values["keep_alive"])
        except ConfigError as exc:
            raise _error(path, nodes["keep_alive"], f"{where}.keep_alive: {exc}") from None
    return ModelEntry(
        model=model.strip(),
        config=RunnerConfig(**fields),
        mode=mode,
        gguf=gguf_path,
        preload=values.get("preload", False),
        pin=values.get("pin", False),
    )


def _error(path: Path, node: yaml.Node, problem: str) -> ManifestError:
    return ManifestError(f"{path}:{node.start_mark.line + 1}: {problem}")


def startup_entries(
    path: Path | None, refs: tuple[str, ...], default_registry: str
) -> list[ModelEntry]:
    """MODEL_RUNNER_MANIFEST's entries, then MODEL_RUNNER_MODELS' that it does not list."""
    entries = load(path, default_registry) if path is not None else []
    listed = {reference.parse(e.model, default_registry).familiar for e in entries}
    for entry in from_list(refs, default_registry):
        if reference.parse(entry.model, default_registry).familiar not in listed:
            entries.append(entry)
    return entries
