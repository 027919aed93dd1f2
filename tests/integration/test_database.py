"""Migrations and the database's own guarantees (contract sections 2, 4 and 8)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import subprocess
import sys
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import uuid4

import asyncpg
import pytest

from tests.support import ROOT, Hub, now_iso, wait_until, with_database
from worker import db, schema
from worker.batch import DetectionRow, Reach
from worker.effects import apply_batch
from worker.intake import decode

# A batch that touches no detection.
NOTHING = Reach(keys=[], stalls_of=[], all_of=[])

pytestmark = pytest.mark.integration


@pytest.fixture
async def empty_database(postgres_admin_url: str) -> str:
    name = f"hub_empty_{uuid4().hex[:10]}"
    admin = await asyncpg.connect(postgres_admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return with_database(postgres_admin_url, name)


def run_migrate(database_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", "migrate"],
        env={"PATH": "/usr/bin:/bin", "HUB_DATABASE_URL": database_url, "HUB_LOG_FORMAT": "json"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_concurrent_migrate_commands_apply_each_migration_once(empty_database: str) -> None:
    results = await asyncio.gather(
        *(asyncio.to_thread(run_migrate, empty_database) for _ in range(4))
    )
    assert [r.returncode for r in results] == [0, 0, 0, 0], [r.stderr for r in results]
    conn = await asyncpg.connect(empty_database)
    try:
        versions = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")]
        assert versions == [version for version, _ in schema.migration_files()]
        tables = {
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
        assert {
            "accounts",
            "spokes",
            "workspaces",
            "tasks",
            "sessions",
            "mappings",
            "detections",
            "dead_letters",
            "processed_events",
            "outbox",
            "schema_migrations",
        } <= tables
    finally:
        await conn.close()
    # Running it again is a no-op.
    again = run_migrate(empty_database)
    assert again.returncode == 0
    assert '"applied": []' in again.stderr


async def test_detections_have_a_partial_unique_index_on_active_dedup_key(hub: Hub) -> None:
    definition = await hub.value(
        "SELECT indexdef FROM pg_indexes WHERE tablename = 'detections'"
        " AND indexdef LIKE 'CREATE UNIQUE INDEX%dedup_key%'"
    )
    assert "WHERE (resolved_at IS NULL)" in definition
    await hub.db.execute("INSERT INTO spokes (id) VALUES ('sp')")
    await hub.db.execute("INSERT INTO sessions (id, spoke_id) VALUES ('s', 'sp')")
    insert = (
        "INSERT INTO detections (id, session_id, anomaly_type, severity, dedup_key, resolved_at)"
        " VALUES ($1, 's', 'X', 'low', 'k', $2)"
    )
    await hub.db.execute(insert, "resolved-1", None)
    with pytest.raises(asyncpg.UniqueViolationError):
        await hub.db.execute(insert, "second-active", None)
    await hub.db.execute("UPDATE detections SET resolved_at = now()")
    await hub.db.execute(insert, "active-again", None)


async def race_signals(database_url: str, prefix: str, writers: int) -> list[BaseException]:
    """`writers` workers' transactions apply a signal of one dedup key at the same
    moment, bypassing the lanes that normally keep a session's events apart; the
    errors they ended with."""
    connections = [await db.connect(database_url) for _ in range(writers)]
    try:
        start = asyncio.Event()

        async def one(conn: db.Connection) -> None:
            body = json.dumps(
                {
                    "eventId": str(uuid4()),
                    "occurredAt": now_iso(),
                    "spokeId": "sp",
                    "sessionId": "s",
                    "severity": "low",
                }
            ).encode()
            intake = decode(prefix, f"{prefix}.spoke.sp.session.s.signal.model_degradation", body)
            # Each connection's first statements are prepared (and their types looked
            # up) before the start, so that on a loaded machine no writer starts so
            # late that it finds the others' detection committed.
            async with conn.transaction():
                await db.load_snapshot(conn, [uuid4()], {"s": "sp"}, NOTHING)
            await start.wait()
            async with conn.transaction():
                await apply_batch(conn, prefix, [intake])
                await asyncio.sleep(0.05)  # hold the transaction open: overlap them all

        tasks = [asyncio.create_task(one(c)) for c in connections]
        await asyncio.sleep(0.1)
        start.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        return [r for r in results if isinstance(r, BaseException)]
    finally:
        for conn in connections:
            await conn.close()


async def open_session(hub: Hub) -> None:
    """Session `s` of spoke `sp` exists before the race: the writers then meet on its
    detections, not on creating it (which makes all but the first wait for its commit)."""
    await hub.db.execute("INSERT INTO spokes (id) VALUES ('sp')")
    await hub.db.execute("INSERT INTO sessions (id, spoke_id) VALUES ('s', 'sp')")


async def race_one_key(hub: Hub, writers: int) -> None:
    """The race test's run and assertion: one active detection, counting every signal."""
    errors = await race_signals(hub.database_url, hub.prefix, writers)
    assert errors == []
    rows = await hub.rows("SELECT occurrence_count, resolved_at FROM detections")
    assert rows == [{"occurrence_count": writers, "resolved_at": None}]


@pytest.mark.parametrize("session", ["new", "existing"])
async def test_concurrent_signals_of_one_key_never_open_two_detections(
    hub: Hub, session: str
) -> None:
    if session == "existing":
        await open_session(hub)
    await race_one_key(hub, writers=12)


def _without(query: db.Query, pattern: str, replacement: str = "") -> db.Query:
    """`query` with its one match of `pattern` replaced: a guard taken out."""
    sql, found = re.subn(pattern, replacement, query.sql, flags=re.DOTALL)
    assert found == 1, f"{query.name} no longer has {pattern!r}: update this control"
    return dataclasses.replace(query, sql=sql)


def _without_the_session_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    """batch_start without FOR NO KEY UPDATE: writers of one session no longer queue
    on its row, so each plans on what it read at the same moment."""
    q = db.queries()
    monkeypatch.setattr(q, "batch_start", _without(q.batch_start, r"\s*FOR NO KEY UPDATE OF s"))


async def test_without_its_guards_the_race_test_fails(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Negative control: the race test catches the race once its guards are gone.

    Two guards keep one key to one active detection: the session row lock, which
    queues the writers of a session, and behind it the partial unique index with
    write_batch's ON CONFLICT arbitration for new detections. Without the index alone the race
    test still passes (the lock queues the writers); without both, each writer opens
    a detection of its own and the race test's assertion fails.
    """
    _without_the_session_lock(monkeypatch)
    q = db.queries()
    insert = _without(q.write_batch, r"ON CONFLICT \(dedup_key\) WHERE .*?(?=RETURNING)")
    monkeypatch.setattr(q, "write_batch", _without(insert, r"\(xmax <> 0\)", "false"))
    await hub.db.execute("DROP INDEX uq_detections_active_dedup_key")
    await open_session(hub)
    with pytest.raises(AssertionError):
        await race_one_key(hub, writers=12)
    active = await hub.value(
        "SELECT count(*) FROM detections WHERE resolved_at IS NULL AND dedup_key = "
        "(SELECT dedup_key FROM detections LIMIT 1)"
    )
    assert active >= 2, "the race test failed, but not on two active detections of one key"


async def test_without_the_session_lock_the_unique_index_still_keeps_one_detection(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard of last resort on its own: writers that find the key taken meanwhile
    are told so (LedgerConflict: the handler redoes their batch one by one), and the
    key keeps a single detection."""
    _without_the_session_lock(monkeypatch)
    await open_session(hub)
    errors = await race_signals(hub.database_url, hub.prefix, writers=12)
    assert errors, "no writer met another: the race did not happen"
    # Without the lock a writer can also deadlock with one it waits for (it locked the
    # active detection the other's insert now merges into, and waits for the session
    # row the other updated): PostgreSQL ends one, which the handler retries as transient.
    stopped = (db.LedgerConflict, asyncpg.DeadlockDetectedError)
    assert all(isinstance(e, stopped) for e in errors), errors
    assert any(isinstance(e, db.LedgerConflict) for e in errors), errors
    # Its count may have lost updates: keeping those is the session lock's job.
    assert await hub.value("SELECT array_agg(resolved_at) FROM detections") == [None]


# The public schema as the catalog describes it, less migrate's own bookkeeping: what
# a database built from the migrations and one built from sql/schema.sql must share.
CATALOG = """
SELECT 'relation' AS kind, c.relname::text AS name,
       concat_ws(' ', c.relkind::text, c.relpersistence::text,
                 array_to_string(c.reloptions, ',')) AS definition
FROM pg_class AS c
WHERE c.relnamespace = 'public'::regnamespace AND c.relname NOT LIKE 'schema_migrations%'
UNION ALL
SELECT 'column', c.relname || '.' || a.attname,
       concat_ws(' ', row_number() OVER (PARTITION BY a.attrelid ORDER BY a.attnum),
                 format_type(a.atttypid, a.atttypmod),
                 CASE WHEN a.attnotnull THEN 'not null' END,
                 'default ' || pg_get_expr(d.adbin, d.adrelid),
                 'identity ' || nullif(a.attidentity::text, ''),
                 'generated ' || nullif(a.attgenerated::text, ''))
FROM pg_attribute AS a
JOIN pg_class AS c ON c.oid = a.attrelid
LEFT JOIN pg_attrdef AS d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')
  AND c.relname <> 'schema_migrations' AND a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT 'constraint', conrelid::regclass::text || '.' || conname, pg_get_constraintdef(oid)
FROM pg_constraint
WHERE connamespace = 'public'::regnamespace AND conrelid::regclass::text <> 'schema_migrations'
UNION ALL
SELECT 'index', indexname::text, indexdef
FROM pg_indexes WHERE schemaname = 'public' AND tablename <> 'schema_migrations'
UNION ALL
SELECT 'function', p.oid::regprocedure::text, pg_get_functiondef(p.oid)
FROM pg_proc AS p WHERE p.pronamespace = 'public'::regnamespace
UNION ALL
SELECT 'trigger', t.tgrelid::regclass::text || '.' || t.tgname, pg_get_triggerdef(t.oid)
FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid
WHERE c.relnamespace = 'public'::regnamespace AND NOT t.tgisinternal
UNION ALL
SELECT 'sequence', s.seqrelid::regclass::text,
       concat_ws(' ', format_type(s.seqtypid, NULL), s.seqstart, s.seqincrement, s.seqmin,
                 s.seqmax, s.seqcache, s.seqcycle)
FROM pg_sequence AS s JOIN pg_class AS c ON c.oid = s.seqrelid
WHERE c.relnamespace = 'public'::regnamespace
ORDER BY kind, name
"""


async def catalog(database_url: str) -> list[tuple[str, str, str]]:
    conn = await asyncpg.connect(database_url)
    try:
        return [(r["kind"], r["name"], r["definition"]) for r in await conn.fetch(CATALOG)]
    finally:
        await conn.close()


async def test_a_database_built_from_schema_sql_is_the_one_the_migrations_build(
    database_url: str, empty_database: str
) -> None:
    conn = await asyncpg.connect(empty_database)
    try:
        await conn.execute(schema.schema_sql_path().read_text(encoding="utf-8"))
    finally:
        await conn.close()
    from_migrations = await catalog(database_url)
    assert ("index", "uq_detections_active_dedup_key") in {(k, n) for k, n, _ in from_migrations}
    # Functions and triggers are compared too; since migration 0009 there are none.
    assert {k for k, _, _ in from_migrations} == {
        "relation",
        "column",
        "constraint",
        "index",
        "sequence",
    }
    from_schema = await catalog(empty_database)
    only_in_migrations = sorted(set(from_migrations) - set(from_schema))
    only_in_schema_sql = sorted(set(from_schema) - set(from_migrations))
    assert (only_in_migrations, only_in_schema_sql) == ([], []), (
        f"sql/schema.sql is not what sql/migrations build: run `{schema.DUMP_COMMAND}`"
    )


def _pg_dump_major() -> int:
    version = subprocess.run(
        [str(schema.pg_dump_binary()), "--version"], capture_output=True, text=True, check=True
    ).stdout
    return int(re.search(r"(\d+)\.", version).group(1))  # type: ignore[union-attr]


async def test_schema_sql_is_what_the_migrations_build(database_url: str) -> None:
    """sql/schema.sql is regenerated with each migration: a dump of a migrated database
    is the file, byte for byte."""
    if os.environ.get("HUB_TEST_DATABASE_URL"):
        conn = await asyncpg.connect(database_url)
        try:
            server_major = int(await conn.fetchval("SHOW server_version_num")) // 10000
        finally:
            await conn.close()
        if server_major != _pg_dump_major():
            pytest.skip(
                f"pg_dump {_pg_dump_major()} writes a PostgreSQL {server_major} differently"
            )
    current = await asyncio.to_thread(schema.dump_schema, database_url)
    diff = schema.stale_diff(current, schema.schema_sql_path().read_text(encoding="utf-8"))
    if diff:
        pytest.fail(
            f"sql/schema.sql is not what sql/migrations build: run `{schema.DUMP_COMMAND}`\n{diff}",
            pytrace=False,
        )


def test_the_wheel_carries_the_sql(tmp_path: Path) -> None:
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("hub_worker-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"worker/sql/{path.relative_to(ROOT / 'sql').as_posix()}"
        for path in (ROOT / "sql").rglob("*.sql")
    }
    assert expected, "sql/ holds the migrations and queries"
    assert expected <= names


async def test_worker_connections_are_bounded_and_migrate_is_not(database_url: str) -> None:
    bounded = await db.connect(database_url)
    unbounded = await db.connect(database_url, bounded=False)
    try:
        for setting, value in [
            ("statement_timeout", "1min"),
            ("idle_in_transaction_session_timeout", "1min"),
        ]:
            assert await bounded.fetchval(f"SHOW {setting}") == value
            assert await unbounded.fetchval(f"SHOW {setting}") == "0"
        # On loopback TCP the server applies the keepalive settings to its socket.
        assert await bounded.fetchval("SHOW tcp_keepalives_idle") == "30"
        assert await bounded.fetchval("SHOW tcp_keepalives_count") == "3"
    finally:
        await bounded.close()
        await unbounded.close()


async def test_a_stuck_statement_or_silent_server_ends_in_an_error_not_a_wait(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server cancels a statement past its limit; the client gives up on an answer
    that does not come (here: a sleep, standing in for a partition) and the error is
    one the worker treats as a lost connection."""
    monkeypatch.setattr(db, "DB_STATEMENT_TIMEOUT_SECONDS", 1)
    conn = await db.connect(database_url)
    try:
        with pytest.raises(asyncpg.QueryCanceledError, match="statement timeout"):
            await conn.execute("SELECT pg_sleep(3)")
    finally:
        await conn.close()
    monkeypatch.setattr(db, "DB_STATEMENT_TIMEOUT_SECONDS", 30)
    monkeypatch.setattr(db, "DB_COMMAND_TIMEOUT_SECONDS", 0.5)
    conn = await db.connect(database_url)
    try:
        with pytest.raises(db.CONNECTION_ERRORS):
            await conn.execute("SELECT pg_sleep(3)")
    finally:
        conn.terminate()


async def test_the_detection_read_selects_the_fields_of_a_detection_row_in_order(
    database_url: str,
) -> None:
    """`load_snapshot` builds DetectionRow positionally from batch_detections."""
    conn = await db.connect(database_url)
    try:
        statement = await conn.prepare(db.queries().batch_detections.sql)
        assert [a.name for a in statement.get_attributes()] == [
            "active",
            *(f.name for f in dataclasses.fields(DetectionRow)),
        ]
    finally:
        await conn.close()


async def test_the_outbox_backlog_counts_from_the_head_and_estimates_past_the_count(
    database_url: str,
) -> None:
    conn = await db.connect(database_url)
    try:
        empty = await db.outbox_backlog(conn)
        assert (empty.rows, empty.oldest, empty.head) == (0, None, None)
        await conn.execute(
            "INSERT INTO outbox (event_id, subject, payload, aggregate) "
            "SELECT gen_random_uuid(), 'x', '', 'a' FROM generate_series(1, 12)"
        )
        ids = [r["id"] for r in await conn.fetch("SELECT id FROM outbox ORDER BY id")]
        # Published out of order: the head and a row in the middle are gone.
        await conn.execute("DELETE FROM outbox WHERE id = ANY($1)", [ids[0], ids[5]])
        counted = await db.outbox_backlog(conn)
        assert (counted.rows, counted.head) == (10, ids[1])
        head_written = await conn.fetchval("SELECT created_at FROM outbox WHERE id = $1", ids[1])
        assert counted.oldest == head_written
        # Past the count: the span of ids from the head, which counts the gap.
        estimated = await db.outbox_backlog(conn, counted=4)
        assert (estimated.rows, estimated.head) == (11, ids[1])
    finally:
        await conn.close()


async def _apply(conn: db.Connection, prefix: str, *events: tuple[str, dict[str, object]]) -> None:
    """One batch of session `s`'s events (subject suffix, body fields) in one transaction."""
    intakes = []
    for what, fields in events:
        body = {
            "eventId": str(uuid4()),
            "occurredAt": now_iso(),
            "spokeId": "sp",
            "sessionId": "s",
            **fields,
        }
        intakes.append(
            decode(prefix, f"{prefix}.spoke.sp.session.s.{what}", json.dumps(body).encode())
        )
    async with conn.transaction():
        await apply_batch(conn, prefix, intakes)


@pytest.mark.parametrize("guarded", [True, False], ids=["second-run", "control"])
async def test_a_key_a_batch_frees_and_opens_again_is_written_after_it_is_freed(
    hub: Hub, monkeypatch: pytest.MonkeyPatch, guarded: bool
) -> None:
    """write_batch writes a batch's new detections with everything else, except those
    taking a key that the same statement frees: to its INSERT that key still looks
    taken. Here a stall is over (a heartbeat resolves it), then a stall signal
    of the same key from a clock ahead, which is not late news, opens it again (and
    another signal opens a key of its own, written in the first run). The
    control writes all new detections in the first run: its INSERT finds the key
    taken (by the row the same statement resolves) and the batch fails."""
    if not guarded:
        monkeypatch.setattr(db, "split_reopened", lambda new, changed: (new, []))
    signal = ("signal.session_stall", {"severity": "low"})
    ahead = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    conn = await db.connect(hub.database_url)
    try:
        await _apply(conn, hub.prefix, signal)
        batch = (
            ("heartbeat", {}),
            (signal[0], {"severity": "high", "occurredAt": ahead}),
            ("signal.model_degradation", {"severity": "medium"}),  # a key of its own
        )
        if not guarded:
            with pytest.raises((db.LedgerConflict, asyncpg.PostgresError)):
                await _apply(conn, hub.prefix, *batch)
            return
        await _apply(conn, hub.prefix, *batch)
    finally:
        await conn.close()
    rows = await hub.rows(
        "SELECT anomaly_type, severity, resolution FROM detections"
        " ORDER BY anomaly_type, resolved_at NULLS LAST"
    )
    assert rows == [
        {"anomaly_type": "MODEL_DEGRADATION", "severity": "medium", "resolution": None},
        {"anomaly_type": "SESSION_STALL", "severity": "low", "resolution": "auto_resolved"},
        {"anomaly_type": "SESSION_STALL", "severity": "high", "resolution": None},
    ]


@pytest.mark.parametrize("runs", [db.BATCH_START_RUNS, 1], ids=["as-built", "control"])
async def test_a_batch_that_waited_for_a_session_created_meanwhile_finds_and_locks_it(
    database_url: str, monkeypatch: pytest.MonkeyPatch, runs: int
) -> None:
    """batch_start creates new sessions and locks the others in one statement, whose
    snapshot cannot see a session another transaction creates meanwhile: its INSERT
    waits for that one, then skips the row. load_snapshot then runs it again, which
    finds the session and locks it; with one run the batch would plan the session as
    new and unlocked (the control, one run, finds the session missing)."""
    monkeypatch.setattr(db, "BATCH_START_RUNS", runs)
    creator, batch, probe = [await db.connect(database_url) for _ in range(3)]
    try:
        creating = creator.transaction()
        await creating.start()
        await db.load_snapshot(creator, [uuid4()], {"x": "sp"}, NOTHING)
        loading = batch.transaction()
        await loading.start()
        load = asyncio.create_task(db.load_snapshot(batch, [uuid4()], {"x": "sp"}, NOTHING))

        async def waits_for_the_creator() -> bool:
            return bool(
                await probe.fetchval(
                    "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1",
                    batch.get_server_pid(),
                )
            )

        await wait_until(waits_for_the_creator, within=10)
        await creating.commit()
        snapshot = await asyncio.wait_for(load, 10)
        if runs == 1:
            assert "x" not in snapshot.sessions
            return
        assert "x" in snapshot.sessions
        with pytest.raises(asyncpg.LockNotAvailableError):
            await probe.execute("SELECT 1 FROM sessions WHERE id = 'x' FOR UPDATE NOWAIT")
        await loading.rollback()
    finally:
        for conn in (creator, batch, probe):
            await conn.close()
