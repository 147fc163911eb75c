"""Byte sizes: Docker-style size settings, MiB for messages, and the machine's memory."""

from __future__ import annotations

import re
from pathlib import Path

MIB = 1024 * 1024
# Share of the machine's memory (or the container's limit) the runners may use by default.
DEFAULT_SHARE = 0.8


def machine_memory() -> int:
    """Physical memory, or the container's cgroup limit when that is lower."""
    total = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            total = int(line.split()[1]) * 1024
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and 0 < int(raw) < total:
            total = int(raw)
    return total


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)$", re.IGNORECASE)


def parse_size(text: str, whole: int) -> int:
    """Bytes from "8g", "8GiB", "512MB", "1073741824" or a share of ``whole`` ("75%").

    Units are binary, as in Docker's ``--memory``: 8g and 8GB both mean 8 GiB.
    """
    text = text.strip()
    if text.endswith("%"):
        try:
            share = float(text[:-1])
        except ValueError:
            raise ValueError("expected a percentage such as 80%") from None
        if not 0 < share <= 100:
            raise ValueError("a percentage must be above 0 and at most 100")
        return int(whole * share / 100)
    match = _SIZE.match(text)
    if not match:
        raise ValueError("expected a size such as 8g, 8GiB, 512MB, 80% or a number of bytes")
    number, prefix = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** ("_kmgt".index(prefix) if prefix else 0))


def mib(n: int) -> str:
    return f"{n / MIB:.0f} MiB"
