"""Settings from the environment (contract section 1), validated once at start."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import quote, urlsplit, urlunsplit

import nkeys  # type: ignore[import-untyped]

from worker.constants import MAX_ACK_PENDING
from worker.subjects import events_stream, out_stream, stream_token

# HUB_BATCH_MAX's default. A transaction has a fixed cost in PostgreSQL (its
# statements' set-up, the commit) besides its cost per event: in a drain on the
# development machine, 500 events a transaction cost PostgreSQL 0.025 ms per
# event against 0.033 with 200, and the worker 0.055 against 0.060
# (docs/performance.md, "Five hundred a transaction"). It is half the consumers'
# max_ack_pending, so a lane's standing pull (2 x HUB_BATCH_MAX) still fits in it;
# a trickle's batches are small whatever the cap.
DEFAULT_BATCH_MAX = 500

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_HOST_PORT_RE = re.compile(r"^(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(?P<port>[0-9]{1,5})$")

LogFormat = Literal["json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]
LOG_LEVELS: tuple[LogLevel, ...] = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A setting is invalid; the message names the variable."""


@dataclass(frozen=True)
class NatsAuth:
    """How to authenticate to NATS and whether to use TLS; secrets stay out of reprs.

    At most one of user/password, token, NKey seed file and credentials file.
    Passwords, tokens and the NKey seed are read once at start; nats-py reads a
    credentials file at every (re)connect, so a rotated one is picked up then.
    """

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    nkey_seed_file: Path | None = None
    creds_file: Path | None = None
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Replies (publish acks, fetches, requests) arrive under this prefix; a
    # per-user prefix lets the server keep each user's replies to itself.
    inbox_prefix: str = "_INBOX"

    @property
    def tls(self) -> bool:
        return any((self.tls_ca_file, self.tls_cert_file, self.tls_key_file))


@dataclass(frozen=True)
class Settings:
    nats_urls: tuple[str, ...] | None = None
    # May carry a password (given in the URL or merged in from
    # HUB_DATABASE_PASSWORD[_FILE]): never printed.
    database_url: str | None = field(default=None, repr=False)
    # The role `hub-worker migrate` grants the runtime rights to (sql/grants.sql).
    database_runtime_role: str | None = None
    nats_auth: NatsAuth = field(default_factory=NatsAuth)
    data_dir: Path = field(default_factory=lambda: Path(".hub"))
    subject_prefix: str = "hub"
    stall_after_seconds: int = 600
    sweep_interval_seconds: int = 30
    stream_max_age_seconds: int = 604_800
    http_addr: str = "127.0.0.1:9464"
    log_format: LogFormat = "json"
    # The least severe log line written, the worker's own and its libraries' alike.
    log_level: LogLevel = "info"
    # Partitions of the inbound stream: sessions are spread over this many
    # ordered lanes. Fixed when the stream is created; an existing stream's
    # own value wins.
    partitions: int = 8
    stream_replicas: int = 1
    shutdown_grace_seconds: int = 20
    # Most inbound messages applied in one transaction; 1 is the per-message
    # mode (one event, one transaction, one ack at a time).
    batch_max: int = DEFAULT_BATCH_MAX
    # Most batch transactions of one worker's lanes at once; 0: no limit.
    lane_turns: int = 2

    @property
    def stream_token(self) -> str:
        return stream_token(self.subject_prefix)

    @property
    def events_stream(self) -> str:
        return events_stream(self.subject_prefix)

    @property
    def out_stream(self) -> str:
        return out_stream(self.subject_prefix)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ

        def text(name: str) -> str | None:
            value = env.get(name)
            return value.strip() if value is not None and value.strip() else None

        def positive_int(
            name: str, default: int, maximum: int | None = None, minimum: int = 1
        ) -> int:
            raw = text(name)
            if raw is None:
                return default
            try:
                value = int(raw)
            except ValueError:
                raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
            if value < minimum or (maximum is not None and value > maximum):
                bound = f" and at most {maximum}" if maximum is not None else ""
                least = "greater than 0" if minimum == 1 else f"at least {minimum}"
                raise ConfigError(f"{name} must be {least}{bound}, got {value}")
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

        def secret(name: str) -> str | None:
            """NAME from the environment, or the contents of the file NAME_FILE names.

            Taken as given (no stripping: a space may be part of a password); a
            file loses only the line ending an editor or `echo` put there.
            """
            value, path = env.get(name) or None, existing_file(f"{name}_FILE")
            if value is not None and path is not None:
                raise ConfigError(f"set {name} or {name}_FILE, not both")
            if path is None:
                return value
            contents = _read(f"{name}_FILE", path).rstrip("\r\n")
            if not contents:
                raise ConfigError(f"{name}_FILE: {path} is empty")
            return contents

        def existing_file(name: str) -> Path | None:
            raw = text(name)
            if raw is None:
                return None
            path = Path(raw)
            if not path.is_file():
                raise ConfigError(f"{name}: no such file {raw!r}")
            return path

        database_url = text("HUB_DATABASE_URL")
        if database_url is not None and not database_url.startswith(
            ("postgres://", "postgresql://")
        ):
            raise ConfigError("HUB_DATABASE_URL must be a postgresql:// DSN")
        database_password = secret("HUB_DATABASE_PASSWORD")
        if database_password is not None:
            if database_url is None:
                raise ConfigError("HUB_DATABASE_PASSWORD needs HUB_DATABASE_URL")
            database_url = with_password(database_url, database_password)

        nats_auth = NatsAuth(
            user=text("HUB_NATS_USER"),
            password=secret("HUB_NATS_PASSWORD"),
            token=secret("HUB_NATS_TOKEN"),
            nkey_seed_file=nkey_seed_file(existing_file("HUB_NATS_NKEY_SEED_FILE")),
            creds_file=creds_file(existing_file("HUB_NATS_CREDS_FILE")),
            tls_ca_file=existing_file("HUB_NATS_TLS_CA_FILE"),
            tls_cert_file=existing_file("HUB_NATS_TLS_CERT_FILE"),
            tls_key_file=existing_file("HUB_NATS_TLS_KEY_FILE"),
            inbox_prefix=text("HUB_NATS_INBOX_PREFIX") or "_INBOX",
        )
        _check_nats_auth(nats_auth)

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

        level_raw = text("HUB_LOG_LEVEL")
        log_level: LogLevel = "info"
        if level_raw is not None:
            for level in LOG_LEVELS:
                if level_raw.lower() == level:
                    log_level = level
                    break
            else:
                raise ConfigError(
                    f"HUB_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {level_raw!r}"
                )

        return cls(
            nats_urls=nats_urls,
            database_url=database_url,
            database_runtime_role=text("HUB_DATABASE_RUNTIME_ROLE"),
            nats_auth=nats_auth,
            data_dir=Path(text("HUB_DATA_DIR") or ".hub"),
            subject_prefix=prefix,
            stall_after_seconds=positive_int("HUB_STALL_AFTER_SECONDS", 600),
            sweep_interval_seconds=positive_int("HUB_SWEEP_INTERVAL_SECONDS", 30),
            stream_max_age_seconds=positive_int("HUB_STREAM_MAX_AGE_SECONDS", 604_800),
            http_addr=http_addr,
            log_format=log_format,
            log_level=log_level,
            partitions=positive_int("HUB_PARTITIONS", 8, maximum=64),
            stream_replicas=positive_int("HUB_STREAM_REPLICAS", 1, maximum=5),
            shutdown_grace_seconds=positive_int("HUB_SHUTDOWN_GRACE_SECONDS", 20),
            batch_max=positive_int("HUB_BATCH_MAX", DEFAULT_BATCH_MAX, maximum=MAX_ACK_PENDING),
            lane_turns=positive_int("HUB_LANE_TURNS", 2, maximum=64, minimum=0),
        )


def with_password(dsn: str, password: str) -> str:
    """The DSN with `password` as its password; one given in the DSN as well is an error."""
    parts = urlsplit(dsn)
    if parts.password is not None:
        raise ConfigError(
            "HUB_DATABASE_URL carries a password and HUB_DATABASE_PASSWORD[_FILE] is set: keep one"
        )
    # A DSN with a host list or no host at all has no netloc to put it in.
    if not parts.hostname:
        raise ConfigError("HUB_DATABASE_PASSWORD needs a HUB_DATABASE_URL with user@host")
    user, _, host = parts.netloc.rpartition("@")
    if not user:
        raise ConfigError("HUB_DATABASE_PASSWORD needs a user in HUB_DATABASE_URL")
    netloc = f"{user}:{quote(password, safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


_CREDS_BLOCK_RE = re.compile(
    r"-{3,}BEGIN (?P<what>NATS USER JWT|USER NKEY SEED)-{3,}\s*\n\s*(?P<body>\S+)\s*\n"
    r"\s*-{3,}END (?P=what)-{3,}"
)


def nkey_seed_file(path: Path | None) -> Path | None:
    """The file, once its contents are a user NKey seed (nats-py would fail later, obscurely)."""
    if path is not None:
        _check_seed("HUB_NATS_NKEY_SEED_FILE", path, _read("HUB_NATS_NKEY_SEED_FILE", path))
    return path


def creds_file(path: Path | None) -> Path | None:
    """The file, once it holds a JWT block and a seed block (nats-py hangs on a file
    without the JWT and fails obscurely without the seed)."""
    if path is None:
        return None
    blocks = {
        m["what"]: m["body"] for m in _CREDS_BLOCK_RE.finditer(_read("HUB_NATS_CREDS_FILE", path))
    }
    for what in ("NATS USER JWT", "USER NKEY SEED"):
        if what not in blocks:
            raise ConfigError(f"HUB_NATS_CREDS_FILE: {path} has no {what} block")
    _check_seed("HUB_NATS_CREDS_FILE", path, blocks["USER NKEY SEED"])
    return path


def _read(name: str, path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{name}: cannot read {path} ({type(err).__name__})") from None


def _check_seed(name: str, path: Path, seed: str) -> None:
    # Never the seed itself in the message: it is the private key.
    try:
        nkeys.from_seed(seed.strip().encode()).public_key  # noqa: B018
    except Exception:
        raise ConfigError(f"{name}: {path} does not hold a valid NKey seed") from None
    if not seed.strip().startswith("SU"):
        raise ConfigError(f"{name}: {path} holds an NKey seed, but not a user's (SU…)")


def _check_nats_auth(auth: NatsAuth) -> None:
    ways = [
        name
        for name, given in (
            ("HUB_NATS_USER", auth.user is not None or auth.password is not None),
            ("HUB_NATS_TOKEN[_FILE]", auth.token is not None),
            ("HUB_NATS_NKEY_SEED_FILE", auth.nkey_seed_file is not None),
            ("HUB_NATS_CREDS_FILE", auth.creds_file is not None),
        )
        if given
    ]
    if len(ways) > 1:
        raise ConfigError(f"choose one way to authenticate to NATS, got {' and '.join(ways)}")
    if (auth.user is None) != (auth.password is None):
        raise ConfigError("HUB_NATS_USER and HUB_NATS_PASSWORD[_FILE] go together")
    if auth.tls_key_file is not None and auth.tls_cert_file is None:
        raise ConfigError("HUB_NATS_TLS_KEY_FILE needs HUB_NATS_TLS_CERT_FILE")
    if not _PREFIX_RE.match(auth.inbox_prefix):
        raise ConfigError(
            "HUB_NATS_INBOX_PREFIX must be dot-separated tokens of [A-Za-z0-9_-], "
            f"got {auth.inbox_prefix!r}"
        )
