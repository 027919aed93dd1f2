"""Argument types of the commands; argparse turns their errors into exit 2."""

from __future__ import annotations

import argparse
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from uuid import UUID

from worker.domain import SEVERITIES


def parse_json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not valid JSON: {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r}")
    return value


def parse_uuid(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a UUID: {text!r}") from None


def _timestamp(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 timestamp: {text!r}") from None


def parse_aware_timestamp(text: str) -> datetime:
    moment = _timestamp(text)
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"needs an offset like +00:00 or Z: {text!r}")
    return moment


_DURATION_RE = re.compile(r"^(\d+)\s*(s|m|h|d|w)$")


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str) -> datetime | Literal["all"]:
    """'all', a duration back from now (10m, 1h), or a timestamp (local time without offset)."""
    text = text.strip()
    if text == "all":
        return "all"
    if match := _DURATION_RE.match(text):
        seconds = int(match.group(1)) * _DURATION_UNITS[match.group(2)]
        return datetime.now(UTC) - timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a timestamp, a duration like 10m or 1h, or 'all', got {text!r}"
        ) from None
    return moment if moment.tzinfo is not None else moment.astimezone()


def parse_severities(text: str) -> list[str]:
    levels = [s.strip().lower() for s in text.split(",") if s.strip()]
    for level in levels:
        if level not in SEVERITIES:
            raise argparse.ArgumentTypeError(f"expected high, medium or low, got {level!r}")
    return levels


def parse_positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value}")
    return value


def parse_positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value
