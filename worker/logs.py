"""structlog set-up: console lines on a terminal, one JSON object per line otherwise.

The worker logs through structlog; its libraries (asyncio, nats-py, asyncpg) log
through the standard library. Both end in the same renderer, so a nats-py read-loop
error is a JSON line like any other (`action="library.log"`, `logger` its name)
rather than plain text in the middle of the JSON stream.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog
from structlog.types import EventDict, Processor, WrappedLogger

from worker.config import LogFormat, LogLevel

__all__ = ["HANDLER_NAME", "LogFormat", "LogLevel", "configure", "level_number"]

# The name of the root handler `configure` installs (found again on a second call).
HANDLER_NAME = "hub-worker"


def level_number(level: LogLevel | int) -> int:
    """`logging`'s number for a level name (`"warning"` -> 30); numbers pass through."""
    if isinstance(level, int):
        return level
    return logging.getLevelNamesMapping()[level.upper()]


def configure(log_format: LogFormat, level: LogLevel | int = "info") -> None:
    """Log structlog's and the standard library's records at `level` and above to stderr."""
    threshold = level_number(level)
    # The console renderer prints exceptions itself; JSON needs them as text.
    rendering: list[Processor] = (
        [structlog.dev.ConsoleRenderer()]
        if log_format == "console"
        else [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    )
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.StackInfoRenderer(),
            *rendering,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.stdlib.add_logger_name,
            _library_action,
            timestamper,
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *rendering],
    )
    handler = _StderrHandler()
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(threshold)


def _library_action(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Every line carries `action`; a library's lines say they are one."""
    event_dict.setdefault("action", "library.log")
    return event_dict


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is when a record arrives (it may be replaced)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream: Any = sys.stderr
        super().emit(record)
