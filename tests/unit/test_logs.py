"""worker/logs.py: the worker's and its libraries' lines end in one renderer, at one level."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from worker import logs


@pytest.fixture
def configured() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    yield
    for handler in [h for h in root.handlers if h.get_name() == logs.HANDLER_NAME]:
        root.removeHandler(handler)
    root.setLevel(level)
    structlog.reset_defaults()


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_library_records_are_json_lines_like_the_workers(
    configured: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.configure("json", "info")
    structlog.get_logger("worker.test").info("worker.said", action="test.say", n=1)
    try:
        raise ConnectionResetError("peer went away")
    except ConnectionResetError:
        logging.getLogger("nats.aio.client").exception("nats: encountered error")
    logging.getLogger("asyncio").info("plain %s", "args")
    worker_line, nats_line, asyncio_line = json_lines(capsys.readouterr().err)
    assert worker_line["event"] == "worker.said"
    assert worker_line["action"] == "test.say"
    assert nats_line["event"] == "nats: encountered error"
    assert nats_line["level"] == "error"
    assert nats_line["logger"] == "nats.aio.client"
    assert nats_line["action"] == "library.log"
    assert "ConnectionResetError: peer went away" in str(nats_line["exception"])
    assert "timestamp" in nats_line
    assert asyncio_line["event"] == "plain args"


@pytest.mark.parametrize("level", ["debug", "info", "warning", "error"])
def test_the_level_applies_to_both(
    configured: None, capsys: pytest.CaptureFixture[str], level: logs.LogLevel
) -> None:
    logs.configure("json", level)
    for name in ("debug", "info", "warning", "error"):
        structlog.get_logger("worker.test").log(
            logs.level_number(name),
            f"worker.{name}",
            action="test",  # type: ignore[arg-type]
        )
        logging.getLogger("asyncpg").log(logs.level_number(name), f"library.{name}")  # type: ignore[arg-type]
    shown = {line["event"] for line in json_lines(capsys.readouterr().err)}
    kept = ["debug", "info", "warning", "error"]
    kept = kept[kept.index(level) :]
    assert shown == {f"{who}.{name}" for who in ("worker", "library") for name in kept}


def test_console_format_renders_library_records_too(
    configured: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.configure("console", "info")
    logging.getLogger("nats").warning("reconnecting")
    err = capsys.readouterr().err
    assert "reconnecting" in err
    assert "_record" not in err


def test_configuring_twice_keeps_one_handler(configured: None) -> None:
    logs.configure("json")
    logs.configure("json")
    root = logging.getLogger()
    assert [h.get_name() for h in root.handlers].count(logs.HANDLER_NAME) == 1
