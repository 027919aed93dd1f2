"""structlog set-up: console lines on a terminal, one JSON object per line otherwise."""

from __future__ import annotations

import logging
import sys

import structlog

from worker.config import LogFormat


def configure(log_format: LogFormat, level: int = logging.INFO) -> None:
    # The console renderer prints exceptions itself; JSON needs them as text.
    rendering: list[structlog.types.Processor] = (
        [structlog.dev.ConsoleRenderer()]
        if log_format == "console"
        else [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            *rendering,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
