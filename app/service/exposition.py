"""Prometheus text in and out: runners' figures labelled as theirs, merged into one exposition.

Each family appears once, whoever reported it; samples that end up with the same name and
labels (two runners of one model name, one of them stopping) add up rather than repeat, which
Prometheus would refuse.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample


def labelled(text: str, labels: Mapping[str, str]) -> list[Metric]:
    """The families in ``text`` with ``labels`` on every sample (over any of its own).
    Raises ValueError for text that is not Prometheus' format."""
    families = list(text_string_to_metric_families(text))
    for family in families:
        family.samples = [s._replace(labels={**s.labels, **labels}) for s in family.samples]
    return families


def merged(families: Iterable[Metric]) -> list[Metric]:
    """One family per name, in the order first seen. A family whose type differs from the
    first one of its name is dropped: both together would not be valid text."""
    by_name: dict[str, Metric] = {}
    samples: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], Sample]] = {}
    for family in families:
        first = by_name.setdefault(family.name, family)
        if first.type != family.type:
            continue
        into = samples.setdefault(family.name, {})
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            seen = into.get(key)
            into[key] = sample if seen is None else seen._replace(value=seen.value + sample.value)
    out = []
    for name, family in by_name.items():
        whole = Metric(name, family.documentation, family.type, family.unit)
        whole.samples = list(samples[name].values())
        out.append(whole)
    return out


def render(families: Iterable[Metric]) -> bytes:
    """The text format, version 0.0.4."""
    return generate_latest(_Fixed(list(families)))


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families
