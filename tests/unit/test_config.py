"""Settings.from_env (contract section 1)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from worker.config import ConfigError, Settings


class _Terminal:
    def __init__(self, tty: bool) -> None:
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def test_defaults_follow_the_contract() -> None:
    settings = Settings.from_env({})
    assert settings.nats_urls is None  # embedded NATS
    assert settings.database_url is None  # embedded PostgreSQL
    assert settings.data_dir == Path(".hub")
    assert settings.subject_prefix == "hub"
    assert settings.stall_after_seconds == 600
    assert settings.batch_max == 500
    assert settings.sweep_interval_seconds == 30
    assert settings.stream_max_age_seconds == 604_800
    assert settings.http_addr == "127.0.0.1:9464"
    assert settings.events_stream == "HUB_EVENTS"
    assert settings.out_stream == "HUB_OUT"


def test_from_env_reads_only_the_mapping_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUB_SUBJECT_PREFIX", "from-os-environ")
    assert Settings.from_env({}).subject_prefix == "hub"


@pytest.mark.parametrize(("tty", "expected"), [(True, "console"), (False, "json")])
def test_log_format_defaults_to_console_on_a_terminal_else_json(
    monkeypatch: pytest.MonkeyPatch, tty: bool, expected: str
) -> None:
    monkeypatch.setattr(sys, "stderr", _Terminal(tty))
    assert Settings.from_env({}).log_format == expected


@pytest.mark.parametrize("value", ["json", "console"])
def test_log_format_can_be_chosen(value: str) -> None:
    assert Settings.from_env({"HUB_LOG_FORMAT": value}).log_format == value


def test_log_level_defaults_to_info() -> None:
    assert Settings.from_env({}).log_level == "info"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("debug", "debug"), ("INFO", "info"), (" Warning ", "warning"), ("error", "error")],
)
def test_log_level_can_be_chosen_in_either_case(value: str, expected: str) -> None:
    assert Settings.from_env({"HUB_LOG_LEVEL": value}).log_level == expected


def test_explicit_values_are_used() -> None:
    settings = Settings.from_env(
        {
            "HUB_NATS_URL": "nats://a.local:4222, tls://b.local:4223",
            "HUB_DATABASE_URL": "postgresql://hub@localhost:5432/hub",
            "HUB_DATA_DIR": "/var/lib/hub",
            "HUB_SUBJECT_PREFIX": "t-42",
            "HUB_STALL_AFTER_SECONDS": "45",
            "HUB_SWEEP_INTERVAL_SECONDS": "5",
            "HUB_STREAM_MAX_AGE_SECONDS": "3600",
            "HUB_HTTP_ADDR": "0.0.0.0:9000",
        }
    )
    assert settings.nats_urls == ("nats://a.local:4222", "tls://b.local:4223")
    assert settings.database_url == "postgresql://hub@localhost:5432/hub"
    assert settings.data_dir == Path("/var/lib/hub")
    assert settings.subject_prefix == "t-42"
    assert settings.stall_after_seconds == 45
    assert settings.sweep_interval_seconds == 5
    assert settings.stream_max_age_seconds == 3600
    assert settings.http_addr == "0.0.0.0:9000"


@pytest.mark.parametrize("dsn", ["postgres://u@localhost/db", "postgresql://localhost:5433/db"])
def test_postgres_dsn_schemes_are_accepted(dsn: str) -> None:
    assert Settings.from_env({"HUB_DATABASE_URL": dsn}).database_url == dsn


@pytest.mark.parametrize("addr", ["localhost:8080", "[::1]:9464", "127.0.0.1:1", "host:65535"])
def test_http_addr_accepts_host_port(addr: str) -> None:
    assert Settings.from_env({"HUB_HTTP_ADDR": addr}).http_addr == addr


def test_empty_http_addr_disables_the_endpoint() -> None:
    assert Settings.from_env({"HUB_HTTP_ADDR": ""}).http_addr == ""


@pytest.mark.parametrize(
    ("prefix", "token", "events", "out"),
    [
        ("hub", "HUB", "HUB_EVENTS", "HUB_OUT"),
        ("t-42", "T_42", "T_42_EVENTS", "T_42_OUT"),
        ("org.hub", "ORG_HUB", "ORG_HUB_EVENTS", "ORG_HUB_OUT"),
        ("Mixed_case-1.x", "MIXED_CASE_1_X", "MIXED_CASE_1_X_EVENTS", "MIXED_CASE_1_X_OUT"),
    ],
)
def test_stream_names_derive_from_the_prefix(
    prefix: str, token: str, events: str, out: str
) -> None:
    settings = Settings.from_env({"HUB_SUBJECT_PREFIX": prefix})
    assert settings.subject_prefix == prefix
    assert settings.stream_token == token
    assert settings.events_stream == events
    assert settings.out_stream == out


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("HUB_STALL_AFTER_SECONDS", "abc"),
        ("HUB_STALL_AFTER_SECONDS", "0"),
        ("HUB_STALL_AFTER_SECONDS", "-5"),
        ("HUB_STALL_AFTER_SECONDS", "1.5"),
        ("HUB_SWEEP_INTERVAL_SECONDS", "abc"),
        ("HUB_SWEEP_INTERVAL_SECONDS", "0"),
        ("HUB_SWEEP_INTERVAL_SECONDS", "-1"),
        ("HUB_STREAM_MAX_AGE_SECONDS", "forever"),
        ("HUB_STREAM_MAX_AGE_SECONDS", "0"),
        ("HUB_STREAM_MAX_AGE_SECONDS", "-604800"),
        ("HUB_SUBJECT_PREFIX", "a b"),
        ("HUB_SUBJECT_PREFIX", "a.>"),
        ("HUB_SUBJECT_PREFIX", "a.*"),
        ("HUB_SUBJECT_PREFIX", "a..b"),
        ("HUB_SUBJECT_PREFIX", ".hub"),
        ("HUB_SUBJECT_PREFIX", "hub."),
        ("HUB_HTTP_ADDR", "nonsense"),
        ("HUB_HTTP_ADDR", "127.0.0.1"),
        ("HUB_HTTP_ADDR", "127.0.0.1:http"),
        ("HUB_HTTP_ADDR", "127.0.0.1:0"),
        ("HUB_HTTP_ADDR", "127.0.0.1:70000"),
        ("HUB_LOG_FORMAT", "xml"),
        ("HUB_LOG_FORMAT", "JSON"),
        ("HUB_LOG_LEVEL", "verbose"),
        ("HUB_LOG_LEVEL", "10"),
        ("HUB_LOG_LEVEL", "critical"),
        ("HUB_NATS_URL", "localhost:4222"),
        ("HUB_NATS_URL", "nats://a:4222,localhost:4223"),
        ("HUB_DATABASE_URL", "mysql://x"),
        ("HUB_DATABASE_URL", "localhost:5432"),
        ("HUB_LANE_TURNS", "-1"),
        ("HUB_LANE_TURNS", "65"),
        ("HUB_LANE_TURNS", "two"),
    ],
)
def test_invalid_setting_raises_config_error_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_lane_turns_default_to_two_and_zero_lifts_the_limit() -> None:
    assert Settings.from_env({}).lane_turns == 2
    assert Settings.from_env({"HUB_LANE_TURNS": "0"}).lane_turns == 0
    assert Settings.from_env({"HUB_LANE_TURNS": "8"}).lane_turns == 8
