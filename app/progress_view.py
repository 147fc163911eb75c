"""Live progress bars for ``pull`` and ``push``, drawn from DMR's NDJSON progress lines.

On a terminal each layer has its own line (bar, bytes, rate, ETA), redrawn in place; in a log
(not a terminal) each layer gets one line when it completes, so CI output stays readable.
"""

from __future__ import annotations

import html
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

_BAR = 24
_REDRAW_S = 0.1


class TransferFailed(Exception):
    """The stream ended in an error line; the message is the service's."""


@dataclass
class _Layer:
    digest: str
    size: int
    current: int = 0
    started: float = field(default_factory=time.monotonic)
    start_bytes: int = -1
    done_reported: bool = False

    def rate(self, now: float) -> float:
        elapsed = now - self.started
        moved = self.current - max(self.start_bytes, 0)
        return moved / elapsed if elapsed > 0.05 and moved > 0 else 0.0


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


class ProgressView:
    def __init__(self, out: TextIO = sys.stderr) -> None:
        self.out = out
        self.tty = out.isatty()
        self.layers: dict[str, _Layer] = {}
        self._drawn = 0
        self._last_draw = 0.0
        self.result = ""

    def feed(self, raw: bytes) -> None:
        """One line of the stream: progress redraws, success is kept, error raises."""
        text = html.unescape(raw.decode("utf-8", "replace")).strip()
        if not text:
            return
        try:
            msg: dict[str, Any] = json.loads(text)
        except ValueError:
            return  # DMR's plain trailer after an error line; the error line said it all
        kind = msg.get("type")
        if kind == "error":
            self.close()
            raise TransferFailed(str(msg.get("message", "")).removeprefix("Error: "))
        if kind == "success":
            self.result = str(msg.get("message", ""))
        elif kind == "progress":
            self._progress(msg.get("layer") or {})
        elif kind == "warning":
            self._print(f"warning: {msg.get('message', '')}")

    def _progress(self, layer: dict[str, Any]) -> None:
        digest = str(layer.get("id", ""))
        if not digest:
            return
        state = self.layers.setdefault(digest, _Layer(digest, int(layer.get("size", 0))))
        state.current = int(layer.get("current", 0))
        if state.start_bytes < 0:
            state.start_bytes, state.started = state.current, time.monotonic()
        if self.tty:
            now = time.monotonic()
            if now - self._last_draw >= _REDRAW_S or state.current >= state.size:
                self._draw(now)
        elif state.current >= state.size and not state.done_reported:
            state.done_reported = True
            elapsed = time.monotonic() - state.started
            self._print(f"{digest[7:19]}: done, {_mb(state.size)} in {elapsed:.1f} s")

    def _line(self, layer: _Layer, now: float) -> str:
        name = layer.digest[7:19]
        if layer.current >= layer.size:
            return f"{name}  complete  {_mb(layer.size)}"
        frac = layer.current / layer.size if layer.size else 0.0
        filled = int(frac * _BAR)
        bar = "#" * filled + "-" * (_BAR - filled)
        rate = layer.rate(now)
        eta = f"ETA {int((layer.size - layer.current) / rate)}s" if rate else "ETA --"
        return (
            f"{name}  [{bar}] {frac * 100:3.0f}%  {_mb(layer.current)} / {_mb(layer.size)}"
            f"  {_mb(rate)}/s  {eta}"
        )

    def _draw(self, now: float) -> None:
        self._last_draw = now
        if self._drawn:
            self.out.write(f"\x1b[{self._drawn}A")
        for layer in self.layers.values():
            self.out.write("\x1b[2K" + self._line(layer, now) + "\n")
        self._drawn = len(self.layers)
        self.out.flush()

    def _print(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def close(self) -> None:
        if self.tty and self.layers:
            self._draw(time.monotonic())
