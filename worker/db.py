"""A running worker's PostgreSQL access: connections, the named-query registry, the queries.

SQL lives in `sql/`: the named queries (`sql/queries/<area>.sql`, `:name` parameters)
are loaded once, at first use; migrations and grants are `worker.schema`'s. Every
function takes the connection first: the caller owns the transaction.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import structlog
from asyncpg.pool import PoolConnectionProxy
from pydantic_core import from_json

from worker.batch import DetectionRow, MappingRow, Plan, Reach, SessionRow, Snapshot
from worker.constants import (
    DB_COMMAND_TIMEOUT_SECONDS,
    DB_KEEPALIVE_COUNT,
    DB_KEEPALIVE_IDLE_SECONDS,
    DB_KEEPALIVE_INTERVAL_SECONDS,
    DB_STATEMENT_TIMEOUT_SECONDS,
    OUTBOX_BACKLOG_COUNTED,
)
from worker.domain import SESSION_STALL, Severity
from worker.events import DetectionState
from worker.outbound import DETECTION, MAPPING, OutboxRow, aggregate_of

log = structlog.get_logger("worker.db")

# A plain connection or one borrowed from a pool: queries accept either.
Connection = asyncpg.Connection | PoolConnectionProxy
Pool = asyncpg.Pool

# Errors that mean "the database is not there right now": the work is retried
# after reconnecting, never dead-lettered.
CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # A connection cut in the middle of an operation can leave asyncpg's protocol
    # refusing further use ("another operation is in progress"): drop it, reconnect.
    asyncpg.InternalClientError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    # Refused at connect time: a rotated password, a pg_hba.conf or a database
    # being fixed, connection slots taken. Waited out like an outage, so the
    # worker resumes when the operator has fixed it, without a restart.
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
    asyncpg.TooManyConnectionsError,
    # A role without the grants it needs (sql/grants.sql): the deployment is at
    # fault, not the message, so it is waited for rather than dead-lettered.
    asyncpg.InsufficientPrivilegeError,
    # A standby, or a primary demoted in a failover: reconnecting finds the new
    # primary (`target_session_attrs=read-write` in a DSN that lists every host).
    asyncpg.ReadOnlySQLTransactionError,
    ConnectionError,
    OSError,
    TimeoutError,
)

# Conditions of the database, not of the message: the same transaction is
# retried with backoff for as long as they last, without counting against the
# message's HANDLER_ATTEMPTS, and a leader duty waits them out too. A lock
# held by an operator (ALTER TABLE, VACUUM FULL) surfaces as a lock timeout
# (with lock_timeout set) or as a statement timeout (the worker's own, 60 s);
# a cancel (pg_cancel_backend), a serialization failure or a deadlock passes
# when tried again; full disks, memory or connection slots are the server's.
# What is here is named in docs/decisions.md ("Transient database errors").
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.LockNotAvailableError,  # 55P03
    asyncpg.QueryCanceledError,  # 57014: statement_timeout, a cancel
    asyncpg.TransactionRollbackError,  # 40001 serialization failure, 40P01 deadlock
    asyncpg.InsufficientResourcesError,  # 53xxx: disk full, out of memory
)

# PostgreSQL keeps this much of an application_name (NAMEDATALEN - 1).
_APPLICATION_NAME_BYTES = 63
_NAME_RE = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def sql_dir() -> Path:
    """`worker/sql` inside an installed wheel, `sql/` beside the package in a checkout."""
    packaged = Path(str(resources.files("worker"))) / "sql"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "sql"


class QueryArguments(TypeError):
    """A query called with a parameter it does not have, or without one it has."""


# What the loader steps over when it looks for `:name` parameters: string literals
# ('…', E'…'), quoted identifiers, comments, dollar-quoted bodies, `::type` casts and
# plpgsql's `:=`. A `:name` inside an array slice (`a[lo:hi]`) would be taken for a
# parameter: write `a[lo : hi]`'s bounds as numbers or parameters instead.
_SQL_TOKEN = re.compile(
    r"""
      (?P<skip>
          [eE]'(?:[^'\\]|\\.|'')*'
        | '(?:[^']|'')*'
        | "(?:[^"]|"")*"
        | --[^\n]*
        | /\*.*?\*/
        | \$(?P<tag>[A-Za-z_][A-Za-z0-9_]*|)\$.*?\$(?P=tag)\$
        | ::
        | :=
      )
    | :(?P<name>[a-z_][a-z0-9_]*)
    | \$(?P<positional>[0-9]+)
    """,
    re.VERBOSE | re.DOTALL,
)


@dataclass(frozen=True)
class Query:
    """A named query of `sql/queries`: `sql` as the server gets it (`$1`, `$2`, …) and
    `params`, the names those stand for in order (`$1` is `params[0]`). A name used
    twice in the file is one parameter."""

    name: str
    sql: str
    params: tuple[str, ...]

    @classmethod
    def parse(cls, name: str, text: str) -> Query:
        """`text` with `:name` parameters; `$n` ones are refused (they say nothing)."""
        params: list[str] = []

        def replace(token: re.Match[str]) -> str:
            if token.group("skip") is not None:
                return token.group(0)
            if token.group("positional") is not None:
                raise RuntimeError(
                    f"query {name!r} uses ${token.group('positional')}: "
                    "name its parameters (:name) instead"
                )
            param = token.group("name")
            if param not in params:
                params.append(param)
            return f"${params.index(param) + 1}"

        return cls(name, _SQL_TOKEN.sub(replace, text), tuple(params))

    def args(self, **values: Any) -> list[Any]:
        """The positional arguments of `sql`, from one keyword argument per parameter."""
        missing = [p for p in self.params if p not in values]
        unknown = sorted(set(values) - set(self.params))
        if missing or unknown:
            raise QueryArguments(
                f"query {self.name!r} takes {list(self.params)}: "
                f"missing {missing}, unknown {unknown}"
            )
        return [values[p] for p in self.params]

    def bind(self, **values: Any) -> tuple[Any, ...]:
        """`(sql, *args)`, for `conn.fetch(*q.bind(...))` and its siblings."""
        return (self.sql, *self.args(**values))


class Queries:
    """Every named query the worker runs; loading fails fast on a missing or unknown name,
    on a block with `$n` parameters, and a call on a missing or unknown parameter name."""

    # batch.sql: applying a batch of inbound events
    batch_start: Query
    batch_detections: Query
    write_batch: Query
    # outbox.sql
    enqueue_outbox: Query
    pending_outbox: Query
    delete_outbox: Query
    outbox_backlog: Query
    set_aside_outbox: Query
    relax_durability: Query
    list_set_aside: Query
    lock_set_aside: Query
    detection_state: Query
    mapping_state: Query
    republish_set_aside: Query
    republished_outcome: Query
    # dead_letters.sql
    insert_dead_letter: Query
    list_dead_letters: Query
    dead_letters_by_id: Query
    begin_dead_letter_replay: Query
    mark_dead_letter_replayed: Query
    dead_letters_by_reason: Query
    # detections.sql: the operators' side
    lock_detection: Query
    resolve_detection: Query
    list_detections: Query
    active_detections_by_severity: Query
    # accounts.sql
    account_exists: Query
    upsert_account: Query
    list_accounts: Query
    # locks.sql: advisory locks
    try_lock: Query
    unlock: Query
    held_locks: Query
    lock_holders: Query
    # heartbeats.sql: lane owners' liveness
    beat: Query
    silent_workers: Query
    end_silent_worker: Query
    forget_worker: Query
    # sweep.sql
    claim_schedule: Query
    stalled_sessions: Query
    open_stalls: Query
    # ledger.sql
    purge_ledger: Query
    # connections.sql
    bound_session: Query
    plan_by_keys: Query
    writable: Query
    # migrations.sql (worker.schema)
    lock_migrations: Query
    unlock_migrations: Query
    create_migrations_table: Query
    applied_migrations: Query
    record_migration: Query
    migrations_table_exists: Query
    role_exists: Query
    quote_ident: Query

    @classmethod
    def load(cls, directory: Path) -> Queries:
        blocks: dict[str, Query] = {}
        for path in sorted(directory.glob("*.sql")):
            for name, body in _split_named(path.read_text(encoding="utf-8")):
                if name in blocks:
                    raise RuntimeError(f"query {name!r} is defined twice (again in {path.name})")
                blocks[name] = Query.parse(name, body)
        declared = set(cls.__annotations__)
        missing, unknown = declared - set(blocks), set(blocks) - declared
        if missing or unknown:
            raise RuntimeError(
                f"sql/queries does not match worker.db.Queries: missing {sorted(missing)}, "
                f"unknown {sorted(unknown)}"
            )
        queries = cls()
        for name, query in blocks.items():
            setattr(queries, name, query)
        return queries


def _split_named(text: str) -> list[tuple[str, str]]:
    marks = list(_NAME_RE.finditer(text))
    named = []
    for index, mark in enumerate(marks):
        end = marks[index + 1].start() if index + 1 < len(marks) else len(text)
        body = "\n".join(
            line for line in text[mark.end() : end].splitlines() if not line.startswith("--")
        ).strip()
        named.append((mark.group(1), body))
    return named


@cache
def queries() -> Queries:
    return Queries.load(sql_dir() / "queries")


# --- connections -----------------------------------------------------------


async def _init_connection(conn: asyncpg.Connection) -> None:
    # Decoded with pydantic-core's parser, a quarter of json.loads' time: every batch
    # reads the details of its keys' detections. What PostgreSQL writes for jsonb is
    # plain JSON (no NaN, no duplicate keys), read alike by both.
    await conn.set_type_codec(
        "jsonb", encoder=json.dumps, decoder=from_json, schema="pg_catalog", format="text"
    )


async def _init_bounded_connection(conn: asyncpg.Connection) -> None:
    await _init_connection(conn)
    await conn.execute(
        *queries().bound_session.bind(
            statement_timeout=f"{DB_STATEMENT_TIMEOUT_SECONDS}s",
            keepalives_idle=str(DB_KEEPALIVE_IDLE_SECONDS),
            keepalives_interval=str(DB_KEEPALIVE_INTERVAL_SECONDS),
            keepalives_count=str(DB_KEEPALIVE_COUNT),
        )
    )


async def plan_by_keys(conn: asyncpg.Connection) -> None:
    await conn.execute(*queries().plan_by_keys.bind())


def tagged(application_name: str) -> str:
    """`name@host:pid`, the host shortened so that PostgreSQL keeps it all (63 bytes)."""
    host, pid = socket.gethostname(), os.getpid()
    room = _APPLICATION_NAME_BYTES - len(application_name.encode()) - len(f"@:{pid}")
    host = host.encode()[: max(0, room)].decode(errors="ignore")
    return f"{application_name}@{host}:{pid}"


def process_of(application_name: str | None) -> str | None:
    """The `host:pid` a `tagged` application_name carries, else None."""
    if not application_name or "@" not in application_name:
        return None
    return application_name.rpartition("@")[2] or None


async def connect(
    dsn: str,
    *,
    application_name: str = "hub-worker",
    bounded: bool = True,
    by_keys: bool = False,
) -> asyncpg.Connection:
    """A connection; `bounded` ones have the statement, transaction and answer time
    limits of the DB_* constants (`migrate` connects unbounded); `by_keys` ones plan
    no sequential scan where an index applies (the lanes', the leaders': see
    sql/queries/connections.sql, plan_by_keys). Its application_name is
    `application_name@host:pid` (see `tagged`)."""
    conn: asyncpg.Connection = await asyncpg.connect(
        dsn,
        server_settings={"application_name": tagged(application_name)},
        timeout=10,
        command_timeout=DB_COMMAND_TIMEOUT_SECONDS if bounded else None,
    )
    try:
        await (_init_bounded_connection if bounded else _init_connection)(conn)
        if by_keys:
            await plan_by_keys(conn)
    except BaseException:
        conn.terminate()
        raise
    return conn


async def create_pool(dsn: str, *, max_size: int = 10) -> Pool:
    """A pool that connects when first used: creating it cannot fail with the database's
    weather (a connection cut just after the migrations stopped the worker), and each
    user of a connection waits out an outage its own way (probes, gauges, commands)."""
    pool: Pool = await asyncpg.create_pool(
        dsn,
        min_size=0,
        max_size=max_size,
        init=_init_bounded_connection,
        server_settings={"application_name": tagged("hub-worker")},
        timeout=10,
        command_timeout=DB_COMMAND_TIMEOUT_SECONDS,
    )
    return pool


async def writable(conn: Connection | Pool) -> bool:
    """Whether this database takes writes: not a standby, not read-only by default."""
    return bool(await conn.fetchval(*queries().writable.bind()))


# --- outbox and dead letters -----------------------------------------------


@dataclass(frozen=True)
class PendingOutbound:
    id: int
    event_id: UUID
    subject: str
    payload: bytes
    aggregate: str


async def enqueue_outbox(conn: Connection, rows: list[OutboxRow]) -> None:
    if not rows:
        return
    await conn.execute(*queries().enqueue_outbox.bind(**_columns(rows, _OUTBOX_COLUMNS)))


async def pending_outbox(conn: Connection, limit: int) -> list[PendingOutbound]:
    rows = await conn.fetch(*queries().pending_outbox.bind(limit=limit))
    return [
        PendingOutbound(r["id"], r["event_id"], r["subject"], r["payload"], r["aggregate"])
        for r in rows
    ]


async def delete_outbox(conn: Connection, ids: list[int]) -> None:
    if ids:
        await conn.execute(*queries().delete_outbox.bind(ids=ids))


async def relax_durability(conn: Connection) -> None:
    await conn.execute(*queries().relax_durability.bind())


@dataclass(frozen=True)
class OutboxBacklog:
    rows: int
    oldest: datetime | None
    # The id of the next row to publish (None: the outbox is empty).
    head: int | None


async def outbox_backlog(
    conn: Connection | Pool, counted: int = OUTBOX_BACKLOG_COUNTED
) -> OutboxBacklog:
    """Rows waiting (counted up to `counted`, estimated from the ids beyond), the head's
    time and id."""
    row = await conn.fetchrow(*queries().outbox_backlog.bind(counted=counted))
    assert row is not None
    return OutboxBacklog(int(row["rows"]), row["oldest"], row["head"])


@dataclass(frozen=True)
class SetAside:
    """An outbox row JetStream refused for good: its id, a short reason, what was said."""

    id: int
    reason: str
    error: str


async def set_aside_outbox(conn: Connection, rows: list[SetAside]) -> None:
    if rows:
        await conn.execute(
            *queries().set_aside_outbox.bind(
                id=[r.id for r in rows],
                reason=[r.reason for r in rows],
                error=[r.error for r in rows],
            )
        )


@dataclass(frozen=True)
class SetAsideRow:
    """A row of outbox_set_aside, as `hub-worker outbox` shows it."""

    id: int
    event_id: UUID
    subject: str
    payload: bytes
    aggregate: str
    created_at: datetime
    reason: str
    error: str
    set_aside_at: datetime
    republished_at: datetime | None


async def list_set_aside(conn: Connection, limit: int) -> list[SetAsideRow]:
    """Newest first."""
    rows = await conn.fetch(*queries().list_set_aside.bind(limit=limit))
    return [SetAsideRow(*r) for r in rows]


async def lock_set_aside(conn: Connection, set_aside_id: int) -> SetAsideRow | None:
    """The row, locked until the caller's transaction ends; None when there is none."""
    row = await conn.fetchrow(*queries().lock_set_aside.bind(id=set_aside_id))
    return None if row is None else SetAsideRow(*row)


async def aggregate_state(conn: Connection, aggregate: str) -> dict[str, Any] | None:
    """The committed state of the detection or mapping an outbox row is about, by field
    name, locked FOR SHARE until the caller's transaction ends; None when it has none
    (a dead letter's announcement) or it is gone."""
    kind, ident = aggregate_of(aggregate)
    if kind == DETECTION:
        row = await conn.fetchrow(*queries().detection_state.bind(id=ident))
    elif kind == MAPPING:
        row = await conn.fetchrow(*queries().mapping_state.bind(session_id=ident))
    else:
        return None
    return None if row is None else dict(row)


async def republish_set_aside(conn: Connection, set_aside_id: int) -> int | None:
    """Put a set-aside row back into the outbox; its new outbox id, None when it was
    republished before."""
    new_id = await conn.fetchval(*queries().republish_set_aside.bind(id=set_aside_id))
    return None if new_id is None else int(new_id)


@dataclass(frozen=True)
class Republished:
    """What became of a republished row, by its new outbox id."""

    id: int
    pending: bool  # still in the outbox
    reason: str | None  # set aside again, for this reason
    error: str | None


async def republished_outcome(conn: Connection, ids: list[int]) -> list[Republished]:
    rows = await conn.fetch(*queries().republished_outcome.bind(id=ids))
    return [Republished(*r) for r in rows]


@dataclass(frozen=True)
class DeadLetterRow:
    id: int
    created_at: datetime


async def insert_dead_letter(
    conn: Connection,
    *,
    subject: str,
    headers: dict[str, str] | None,
    payload: bytes,
    reason: str,
    error: str,
    deliveries: int,
    stream_position: str | None,
    subject_bytes: bytes | None = None,
    headers_bytes: bytes | None = None,
) -> DeadLetterRow | None:
    """Store a dead letter; None when this stream position was dead-lettered before.

    `subject`, `headers` and `error` must be storable text (worker.storable);
    the `*_bytes` hold the exact subject and headers when those differ.
    """
    row = await conn.fetchrow(
        *queries().insert_dead_letter.bind(
            subject=subject,
            headers=headers,
            payload=payload,
            reason=reason,
            error=error,
            deliveries=deliveries,
            stream_position=stream_position,
            subject_bytes=subject_bytes,
            headers_bytes=headers_bytes,
        )
    )
    return None if row is None else DeadLetterRow(row["id"], row["created_at"])


# --- advisory locks and maintenance ----------------------------------------


async def try_lock(conn: Connection, namespace: int, key: int) -> bool:
    return bool(await conn.fetchval(*queries().try_lock.bind(namespace=namespace, key=key)))


async def unlock(conn: Connection, namespace: int, key: int) -> bool:
    return bool(await conn.fetchval(*queries().unlock.bind(namespace=namespace, key=key)))


async def held_locks(conn: Connection, namespace: int, start: int, stop: int) -> set[int]:
    """Keys in [start, stop) of a namespace that some connection holds right now."""
    rows = await conn.fetch(*queries().held_locks.bind(namespace=namespace, start=start, stop=stop))
    return {int(r["objid"]) for r in rows}


# --- lane owners' heartbeats ------------------------------------------------


async def beat(conn: Connection, worker_id: str) -> None:
    """Say that worker `worker_id` is alive (the database's clock)."""
    await conn.execute(*queries().beat.bind(worker_id=worker_id))


async def silent_workers(conn: Connection, silent_seconds: float) -> list[str]:
    """Workers whose last beat is older than `silent_seconds`."""
    rows = await conn.fetch(*queries().silent_workers.bind(silent_seconds=silent_seconds))
    return [str(r["worker_id"]) for r in rows]


async def end_silent_worker(conn: Connection, worker_id: str, silent_seconds: float) -> int:
    """Terminate the tagged backends of `worker_id` if it is still silent; how many."""
    query = queries().end_silent_worker
    return int(await conn.fetchval(*query.bind(worker_id=worker_id, silent_seconds=silent_seconds)))


async def forget_worker(conn: Connection, worker_id: str) -> None:
    await conn.execute(*queries().forget_worker.bind(worker_id=worker_id))


async def purge_ledger(conn: Connection, older_than_seconds: float, batch: int) -> int:
    status: str = await conn.execute(
        *queries().purge_ledger.bind(older_than_seconds=older_than_seconds, batch=batch)
    )
    return int(status.split()[-1])


# --- the stall sweep ---------------------------------------------------------


async def claim_schedule(conn: Connection, name: str, interval_seconds: float) -> int | None:
    """Claim this interval's run of a periodic duty: its run number, or None if it ran."""
    runs = await conn.fetchval(
        *queries().claim_schedule.bind(name=name, interval_seconds=interval_seconds)
    )
    return None if runs is None else int(runs)


async def stalled_sessions(
    conn: Connection, stall_after_seconds: float, limit: int, anomaly_type: str
) -> list[str]:
    """Silent sessions without an active stall detection yet."""
    rows = await conn.fetch(
        *queries().stalled_sessions.bind(
            stall_after_seconds=stall_after_seconds, limit=limit, anomaly_type=anomaly_type
        )
    )
    return [r["id"] for r in rows]


@dataclass(frozen=True)
class StallCandidate:
    session_id: str
    dedup_key: str
    detection_id: str


async def open_stalls(
    conn: Connection,
    candidates: list[StallCandidate],
    *,
    anomaly_type: str,
    severity: Severity,
    stall_after_seconds: float,
) -> list[DetectionState]:
    """Open a stall detection for each candidate still stalled and without an active one."""
    rows = await conn.fetch(
        *queries().open_stalls.bind(
            session_id=[c.session_id for c in candidates],
            dedup_key=[c.dedup_key for c in candidates],
            detection_id=[c.detection_id for c in candidates],
            anomaly_type=anomaly_type,
            severity=severity,
            stall_after_seconds=stall_after_seconds,
        )
    )
    return [DetectionState.model_validate(dict(r)) for r in rows]


# --- commands ------------------------------------------------------------------


async def lock_detection(conn: Connection, detection_id: str) -> tuple[bool, bool]:
    """(exists, resolved) of a detection, locking its row."""
    row = await conn.fetchrow(*queries().lock_detection.bind(detection_id=detection_id))
    return (row is not None, row is not None and row["resolved_at"] is not None)


async def account_exists(conn: Connection, account_id: str) -> bool:
    return bool(await conn.fetchval(*queries().account_exists.bind(account_id=account_id)))


async def resolve_detection(
    conn: Connection, detection_id: str, resolved_by: str, resolution: str
) -> DetectionState | None:
    row = await conn.fetchrow(
        *queries().resolve_detection.bind(
            detection_id=detection_id, resolved_by=resolved_by, resolution=resolution
        )
    )
    return None if row is None else DetectionState.model_validate(dict(row))


@dataclass(frozen=True)
class Account:
    id: str
    name: str | None
    created_at: datetime


async def upsert_account(
    conn: Connection, account_id: str, name: str | None
) -> tuple[Account, bool]:
    """The account, and whether it was created now (False: it existed)."""
    row = await conn.fetchrow(*queries().upsert_account.bind(account_id=account_id, name=name))
    assert row is not None
    return Account(row["id"], row["name"], row["created_at"]), bool(row["created"])


async def list_accounts(conn: Connection) -> list[Account]:
    return [
        Account(r["id"], r["name"], r["created_at"])
        for r in await conn.fetch(*queries().list_accounts.bind())
    ]


# --- operator commands (worker/cli/) ------------------------------------


async def list_detections(
    conn: Connection, *, include_resolved: bool, session_id: str | None, limit: int
) -> list[DetectionState]:
    """Active detections, highest severity first; with include_resolved, the latest changed."""
    rows = await conn.fetch(
        *queries().list_detections.bind(
            include_resolved=include_resolved, session_id=session_id, limit=limit
        )
    )
    return [DetectionState.model_validate(dict(r)) for r in rows]


@dataclass(frozen=True)
class DeadLetter:
    """A stored dead letter, with the replays `hub-worker deadletters replay` made of it."""

    id: int
    created_at: datetime
    subject: str
    headers: dict[str, str] | None
    payload: bytes
    reason: str
    error: str
    deliveries: int
    replayed_at: datetime | None
    replay_count: int


def _dead_letter_row(row: asyncpg.Record) -> DeadLetter:
    headers = row["headers"]
    return DeadLetter(
        id=int(row["id"]),
        created_at=row["created_at"],
        subject=row["subject"],
        headers={str(k): str(v) for k, v in headers.items()} if headers else None,
        payload=bytes(row["payload"]),
        reason=row["reason"],
        error=row["error"],
        deliveries=int(row["deliveries"]),
        replayed_at=row["replayed_at"],
        replay_count=int(row["replay_count"]),
    )


async def list_dead_letters(
    conn: Connection, *, reason: str | None, limit: int
) -> list[DeadLetter]:
    """Newest first, of one reason or all."""
    rows = await conn.fetch(*queries().list_dead_letters.bind(reason=reason, limit=limit))
    return [_dead_letter_row(r) for r in rows]


async def dead_letters_by_id(conn: Connection, ids: list[int]) -> list[DeadLetter]:
    """The dead letters with these ids that exist, in id order."""
    rows = await conn.fetch(*queries().dead_letters_by_id.bind(ids=ids))
    return [_dead_letter_row(r) for r in rows]


async def begin_dead_letter_replay(conn: Connection, dead_letter_id: int) -> int | None:
    """Record a replay about to be published: its number (that of an unconfirmed earlier
    attempt, retried), or None when the letter is gone."""
    count = await conn.fetchval(
        *queries().begin_dead_letter_replay.bind(dead_letter_id=dead_letter_id)
    )
    return None if count is None else int(count)


async def mark_dead_letter_replayed(
    conn: Connection, dead_letter_id: int, replay: int
) -> tuple[datetime, int] | None:
    """Confirm replay number `replay` was stored by JetStream: (replayed_at, replay_count),
    or None when the letter is gone or a later replay has begun meanwhile."""
    row = await conn.fetchrow(
        *queries().mark_dead_letter_replayed.bind(dead_letter_id=dead_letter_id, replay=replay)
    )
    return None if row is None else (row["replayed_at"], int(row["replay_count"]))


# --- batches of inbound events (see worker.batch and worker.effects) ----------


# --- status (sql/queries/status.sql) ------------------------------------------------


@dataclass(frozen=True)
class LockHolder:
    """An advisory lock of the hub's namespace and the session holding it."""

    key: int
    backend_pid: int
    application_name: str | None
    client_addr: str | None
    backend_start: datetime | None


async def lock_holders(conn: Connection, namespace: int) -> list[LockHolder]:
    rows = await conn.fetch(*queries().lock_holders.bind(namespace=namespace))
    return [
        LockHolder(
            int(r["key"]),
            int(r["pid"]),
            r["application_name"],
            r["client_addr"],
            r["backend_start"],
        )
        for r in rows
    ]


async def dead_letters_by_reason(conn: Connection, within_seconds: float) -> dict[str, int]:
    rows = await conn.fetch(*queries().dead_letters_by_reason.bind(within_seconds=within_seconds))
    return {str(r["reason"]): int(r["letters"]) for r in rows}


async def active_detections_by_severity(conn: Connection) -> dict[str, int]:
    rows = await conn.fetch(*queries().active_detections_by_severity.bind())
    return {str(r["severity"]): int(r["detections"]) for r in rows}


def _json_text(value: dict[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(value)


def _session_row(r: asyncpg.Record) -> SessionRow:
    return SessionRow(
        r["id"],
        r["spoke_id"],
        r["status"],
        r["last_activity_at"],
        r["ended_at"],
        r["archived_at"],
        r["metadata"],
    )


def _mapping_row(r: asyncpg.Record) -> MappingRow:
    """The mapping columns (m_…) of a batch_start row."""
    return MappingRow(
        r["m_id"],
        r["id"],
        r["m_spoke_id"],
        r["m_workspace_id"],
        r["m_parent_session_id"],
        r["m_task_id"],
        r["m_task"],
        r["m_status"],
        r["m_metadata"],
        r["m_created_at"],
        r["m_updated_at"],
    )


# A session another transaction created after batch_start's snapshot is neither
# created nor locked by it (its INSERT waited for that transaction, then skipped the
# row); the next run sees the session and locks it.
BATCH_START_RUNS = 2


async def load_snapshot(
    conn: Connection,
    event_ids: list[UUID],
    first_spokes: dict[str, str],
    reach: Reach,
) -> Snapshot:
    """Load and lock the rows a batch of events can touch (`reach`: which detections).

    `first_spokes` maps each session of the batch to the spoke of its first
    event: the owner of a session this creates.
    """
    q = queries()
    session_ids = sorted(first_spokes)
    start = q.batch_start.bind(
        event_ids=event_ids,
        id=session_ids,
        spoke_id=[first_spokes[s] for s in session_ids],
    )
    sessions: dict[str, SessionRow] = {}
    mappings: dict[str, MappingRow] = {}
    for _ in range(BATCH_START_RUNS):
        for r in await conn.fetch(*start):
            if r["head"]:
                now, applied = r["now"], set(r["applied"])
                continue
            sessions[r["id"]] = _session_row(r)
            if r["m_id"] is not None:
                mappings[r["id"]] = _mapping_row(r)
        if len(sessions) == len(session_ids):
            break
    active: dict[str, DetectionRow] = {}
    resolved: dict[str, DetectionRow] = {}
    detections = q.batch_detections.bind(
        session_ids=session_ids,
        dedup_key=reach.keys,
        stalls_of=reach.stalls_of,
        stall_type=SESSION_STALL,
        all_of=reach.all_of,
    )
    for r in await conn.fetch(*detections):
        # After `active`, DetectionRow's fields in its order (a test checks it): built
        # positionally, ~230 rows a batch cost a third of building them from dicts.
        row = DetectionRow(*tuple(r)[1:])
        (active if r["active"] else resolved)[row.dedup_key] = row
    return Snapshot(now, applied, sessions, mappings, active, resolved)


# The columns batch.sql's unnest() writes take, each a parameter of that name (a list
# per column: `unnest(:id::text[], :status::text[], …) AS s (id, status, …)`); jsonb
# travels as text.
_SESSION_COLUMNS = (
    "id",
    "spoke_id",
    "status",
    "last_activity_at",
    "ended_at",
    "archived_at",
    "metadata",
)
_MAPPING_COLUMNS = (
    "id",
    "session_id",
    "spoke_id",
    "workspace_id",
    "parent_session_id",
    "task_id",
    "task",
    "status",
    "metadata",
    "created_at",
    "updated_at",
)
_CHANGED_DETECTION_COLUMNS = (
    "id",
    "severity",
    "details",
    "occurrence_count",
    "updated_at",
    "resolved_at",
    "resolved_by",
    "resolution",
)
_NEW_DETECTION_COLUMNS = (
    "id",
    "session_id",
    "anomaly_type",
    "severity",
    "details",
    "dedup_key",
    "occurrence_count",
    "created_at",
    "updated_at",
    "resolved_at",
    "resolved_by",
    "resolution",
)
_OUTBOX_COLUMNS = ("event_id", "subject", "payload", "aggregate")
_JSON_COLUMNS = frozenset({"metadata", "details"})


def _columns(
    rows: Sequence[object], names: tuple[str, ...], prefix: str = ""
) -> dict[str, list[Any]]:
    """Rows turned into one list per column, keyed by the parameter's name: the
    column's, after `prefix` (write_batch writes several tables in one statement)."""
    return {
        prefix + name: [
            _json_text(getattr(r, name)) if name in _JSON_COLUMNS else getattr(r, name)
            for r in rows
        ]
        for name in names
    }


class LedgerConflict(Exception):
    """Another transaction changed what the batch was planned on: redo it one by one."""


def split_reopened(
    new: list[DetectionRow], changed: list[DetectionRow]
) -> tuple[list[DetectionRow], list[DetectionRow]]:
    """The new detections write_batch can insert with everything else, and those whose
    key is a changed one's: freed by this batch (resolved), a key its INSERT would
    still find taken."""
    freed = {d.dedup_key for d in changed}
    return [d for d in new if d.dedup_key not in freed], [d for d in new if d.dedup_key in freed]


async def write_plan(conn: Connection, plan: Plan) -> None:
    """Write what `worker.batch.simulate` decided: one statement, and a second for new
    detections that take a key the first frees (write_batch's new_detection)."""
    q = queries()
    sessions = sorted(plan.sessions.values(), key=lambda r: r.id)
    mappings = [*plan.new_mappings.values(), *plan.changed_mappings.values()]
    changed = sorted(plan.changed_detections.values(), key=lambda d: d.id)
    new, reopened = split_reopened(list(plan.new_detections.values()), changed)
    written = await conn.fetchrow(
        *q.write_batch.bind(
            ledger=plan.ledger,
            spoke_id=sorted(plan.spokes),
            workspace_id=sorted(plan.workspaces),
            task_id=sorted(plan.tasks),
            # A parent that is one of the batch's sessions is written with them.
            parent_id=sorted(plan.parent_sessions - plan.sessions.keys()),
            **_columns(sessions, _SESSION_COLUMNS, "s_"),
            **_columns(mappings, _MAPPING_COLUMNS, "m_"),
            **_columns(changed, _CHANGED_DETECTION_COLUMNS, "d_"),
            **_columns(new, _NEW_DETECTION_COLUMNS, "n_"),
            **_columns(plan.outbound, _OUTBOX_COLUMNS, "o_"),
        )
    )
    assert written is not None
    if written["recorded"] != len(plan.ledger):
        raise LedgerConflict(
            f"{len(plan.ledger) - written['recorded']} events were applied meanwhile"
        )
    merged = written["merged"]
    if reopened:
        # Rare: a key resolved and opened again in one batch (a stall over, then a
        # new one). Nothing else to write; the first run freed the keys.
        nothing: dict[str, list[Any]] = {name: [] for name in q.write_batch.params}
        columns = _columns(reopened, _NEW_DETECTION_COLUMNS, "n_")
        second = await conn.fetchrow(*q.write_batch.bind(**{**nothing, **columns}))
        assert second is not None
        merged += second["merged"]
    if merged:
        raise LedgerConflict("an active detection of the batch's keys appeared meanwhile")
