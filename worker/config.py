"""Settings from the environment (contract section 1), validated once at start."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from worker.constants import MAX_ACK_PENDING

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_HOST_PORT_RE = re.compile(r"^(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(?P<port>[0-9]{1,5})$")

LogFormat = Literal["json", "console"]


def stream_token(prefix: str) -> str:
    """`PU`: the prefix upper-cased with everything outside [A-Z0-9] turned into `_`."""
    return re.sub(r"[^A-Z0-9]", "_", prefix.upper())


class ConfigError(ValueError):
    """A setting is invalid; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    nats_urls: tuple[str, ...] | None = None
    database_url: str | None = None
    data_dir: Path = field(default_factory=lambda: Path(".hub"))
    subject_prefix: str = "hub"
    stall_after_seconds: int = 600
    sweep_interval_seconds: int = 30
    stream_max_age_seconds: int = 604_800
    http_addr: str = "127.0.0.1:9464"
    log_format: LogFormat = "json"
    # Partitions of the inbound stream: sessions are spread over this many
    # ordered lanes. Fixed when the stream is created; an existing stream's
    # own value wins.
    partitions: int = 8
    stream_replicas: int = 1
    shutdown_grace_seconds: int = 20
    # Most inbound messages applied in one transaction; 1 is the per-message
    # mode (one event, one transaction, one ack at a time).
    batch_max: int = 200

    @property
    def stream_token(self) -> str:
        return stream_token(self.subject_prefix)

    @property
    def events_stream(self) -> str:
        return f"{self.stream_token}_EVENTS"

    @property
    def out_stream(self) -> str:
        return f"{self.stream_token}_OUT"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ

        def text(name: str) -> str | None:
            value = env.get(name)
            return value.strip() if value is not None and value.strip() else None

        def positive_int(name: str, default: int, maximum: int | None = None) -> int:
            raw = text(name)
            if raw is None:
                return default
            try:
                value = int(raw)
            except ValueError:
                raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
            if value <= 0 or (maximum is not None and value > maximum):
                bound = f" and at most {maximum}" if maximum is not None else ""
                raise ConfigError(f"{name} must be greater than 0{bound}, got {value}")
            return value

        nats_raw = text("HUB_NATS_URL")
        nats_urls: tuple[str, ...] | None = None
        if nats_raw is not None:
            nats_urls = tuple(u.strip() for u in nats_raw.split(",") if u.strip())
            for url in nats_urls:
                if "://" not in url:
                    raise ConfigError(
                        f"HUB_NATS_URL must be URLs like nats://host:4222, got {url!r}"
                    )

        database_url = text("HUB_DATABASE_URL")
        if database_url is not None and not database_url.startswith(
            ("postgres://", "postgresql://")
        ):
            raise ConfigError("HUB_DATABASE_URL must be a postgresql:// DSN")

        prefix = text("HUB_SUBJECT_PREFIX") or "hub"
        if not _PREFIX_RE.match(prefix):
            raise ConfigError(
                f"HUB_SUBJECT_PREFIX must be dot-separated tokens of [A-Za-z0-9_-], got {prefix!r}"
            )

        http_addr = env.get("HUB_HTTP_ADDR", "127.0.0.1:9464").strip()
        if http_addr:
            match = _HOST_PORT_RE.match(http_addr)
            if match is None or not 0 < int(match["port"]) < 65536:
                raise ConfigError(f"HUB_HTTP_ADDR must be host:port or empty, got {http_addr!r}")

        log_raw = text("HUB_LOG_FORMAT")
        log_format: LogFormat
        if log_raw is None:
            log_format = "console" if sys.stderr.isatty() else "json"
        elif log_raw in ("json", "console"):
            log_format = "json" if log_raw == "json" else "console"
        else:
            raise ConfigError(f"HUB_LOG_FORMAT must be 'json' or 'console', got {log_raw!r}")

        return cls(
            nats_urls=nats_urls,
            database_url=database_url,
            data_dir=Path(text("HUB_DATA_DIR") or ".hub"),
            subject_prefix=prefix,
            stall_after_seconds=positive_int("HUB_STALL_AFTER_SECONDS", 600),
            sweep_interval_seconds=positive_int("HUB_SWEEP_INTERVAL_SECONDS", 30),
            stream_max_age_seconds=positive_int("HUB_STREAM_MAX_AGE_SECONDS", 604_800),
            http_addr=http_addr,
            log_format=log_format,
            partitions=positive_int("HUB_PARTITIONS", 8, maximum=64),
            stream_replicas=positive_int("HUB_STREAM_REPLICAS", 1, maximum=5),
            shutdown_grace_seconds=positive_int("HUB_SHUTDOWN_GRACE_SECONDS", 20),
            batch_max=positive_int("HUB_BATCH_MAX", 200, maximum=MAX_ACK_PENDING),
        )
