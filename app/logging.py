"""structlog set-up: console lines for people, JSON lines for log collectors."""

from __future__ import annotations

import logging
import sys

import structlog

from app.settings import Settings


def configure_logging(settings: Settings) -> None:
    level = logging.getLevelName(settings.log_level.upper())
    renderer: structlog.typing.Processor
    if settings.log_format == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # aiohttp's own access log would duplicate our request line.
    logging.getLogger("aiohttp.access").disabled = True
    # Libraries' own warnings (asyncio, aiohttp) reach stderr once per kind and window: a flood
    # of bad connections must not become a flood of identical tracebacks.
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RepeatFilter())
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)


class RepeatFilter(logging.Filter):
    """Lets a message through once per ``window_s`` seconds per logger and text; the next one
    to pass says how many were held back."""

    def __init__(self, window_s: float = 10.0) -> None:
        super().__init__()
        self.window_s = window_s
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        if len(self._seen) > 1000:  # many different messages are not a flood of one
            self._seen.clear()
        first, held = self._seen.get(key, (0.0, 0))
        if record.created - first < self.window_s:
            self._seen[key] = (first, held + 1)
            return False
        self._seen[key] = (record.created, 0)
        if held:
            record.msg = f"{record.msg} (and {held} more like it in the last {self.window_s:.0f} s)"
        return True


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)
