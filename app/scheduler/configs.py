"""Per-model runner configurations: the preload manifest's entries are the base, and a
``_configure`` request overrides them until the model is unloaded."""

from __future__ import annotations

from app.scheduler.launch import RunnerKey
from app.scheduler.runner_config import RunnerConfig, layered


class ModelConfigs:
    def __init__(self) -> None:
        self._base: dict[RunnerKey, RunnerConfig] = {}
        self._overrides: dict[RunnerKey, RunnerConfig] = {}
        self._pinned: set[RunnerKey] = set()

    def set_base(self, key: RunnerKey, config: RunnerConfig, pin: bool = False) -> None:
        """A manifest entry: its settings, and whether its runner is never stopped on its own."""
        self._base[key] = config
        if pin:
            self._pinned.add(key)

    def effective(self, key: RunnerKey) -> RunnerConfig:
        return self._overrides.get(key) or self._base.get(key) or RunnerConfig()

    def over_base(self, key: RunnerKey, config: RunnerConfig) -> RunnerConfig:
        """What ``config`` means for this model: a _configure that sets only keep_alive keeps
        the manifest's context size."""
        return layered(self._base.get(key), config)

    def override(self, key: RunnerKey, config: RunnerConfig) -> None:
        self._overrides[key] = config

    def clear_overrides(self, model_ids: set[str] | None) -> None:
        for key in [k for k in self._overrides if model_ids is None or k.model_id in model_ids]:
            del self._overrides[key]

    def is_pinned(self, key: RunnerKey) -> bool:
        return key in self._pinned

    def listing(self) -> list[tuple[RunnerKey, RunnerConfig]]:
        """Every configured model, its override in place of its base."""
        return list({**self._base, **self._overrides}.items())
