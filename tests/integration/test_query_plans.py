"""What a batch costs must not grow with the tables (issue 13).

The tables are seeded with tens of thousands of rows, then every hot-path query
is planned as asyncpg's prepared statements get it after a few runs: the
generic plan (`plan_cache_mode = force_generic_plan`), which cannot see how few
sessions `session_id = ANY($1)` names. Each is run with EXPLAIN ANALYZE (and
rolled back) on a batch's worth of keys; a plan fails on a sequential scan of a
seeded table, on an index scan that reads (or is expected to read) far more rows
than the batch has (an index walked for its order and filtered, as
`idx_detections_resolved_at` was for the active detections of a batch's
sessions), and on a parallel plan. At these sizes no plan goes parallel; on an
unanalysed 1,000,000-row table one did (see docs/performance.md), which is why
`batch_detections` probes one resolved row per key by construction.

Plans made while the tables were empty are checked too: a connection keeps them
while the tables fill, until an ANALYZE (docs/decisions.md, "Plans by key").
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import asyncpg
import pytest

from tests.support import Hub, wait_until
from worker import db

SESSIONS = 20_000
DETECTIONS = 60_000
LEDGER = 100_000
BATCH = 100
SEEDED = {"sessions", "mappings", "detections", "processed_events", "spokes", "outbox"}
# An index scan of a seeded table may read (return or filter out) at most this
# many rows more than a batch's worth for each key of the batch.
SLACK_ROWS = 500

SEED = """
INSERT INTO spokes (id) SELECT 'spoke-' || g FROM generate_series(0, 19) AS g;
INSERT INTO sessions (id, spoke_id, status, last_activity_at, ended_at, archived_at)
SELECT 's-' || g, 'spoke-' || (g % 20),
       CASE WHEN g % 10 = 0 THEN 'active' ELSE 'completed' END,
       now() - make_interval(secs => g),
       CASE WHEN g % 10 = 0 THEN NULL ELSE now() END,
       CASE WHEN g % 10 BETWEEN 1 AND 6 THEN now() END
FROM generate_series(1, $1::int) AS g;
INSERT INTO mappings (id, session_id, spoke_id, status)
SELECT 'm-' || g, 's-' || g, 'spoke-' || (g % 20), 'completed'
FROM generate_series(1, $1::int) AS g;
INSERT INTO detections (id, session_id, anomaly_type, severity, details, dedup_key,
                        created_at, resolved_at, resolution)
SELECT 'd-' || g,
       's-' || CASE WHEN g % 10 < $4::int THEN (g % ($1::int / 10)) * 10 + 10
                    ELSE g % $1::int + 1 END,
       'model_degradation', 'low', '{}'::jsonb,
       CASE WHEN g % 10 < $4::int THEN 'active-' || g ELSE 'resolved-' || (g / 3) END,
       now() - make_interval(secs => g),
       CASE WHEN g % 10 < $4::int THEN NULL ELSE now() - make_interval(secs => g) END,
       CASE WHEN g % 10 < $4::int THEN NULL ELSE 'auto_resolved' END
FROM generate_series(1, $2::int) AS g;
INSERT INTO processed_events (event_id) SELECT gen_random_uuid() FROM generate_series(1, $3::int);
-- A NATS outage's worth of announcements not yet published.
INSERT INTO outbox (event_id, subject, payload, aggregate)
SELECT gen_random_uuid(), 'x.y', '', 'a-' || g FROM generate_series(1, $2::int / 3) AS g;
"""


async def seed(conn: asyncpg.Connection, active_tenths: int) -> None:
    sizes = {
        "$1::int": SESSIONS,
        "$2::int": DETECTIONS,
        "$3::int": LEDGER,
        "$4::int": active_tenths,
    }
    script = SEED
    for placeholder, size in sizes.items():
        script = script.replace(placeholder, str(size))
    await conn.execute(script)


@pytest.fixture(params=[1, 7], ids=["10%-active", "70%-active"])
async def seeded(
    database_url: str, request: pytest.FixtureRequest
) -> AsyncIterator[asyncpg.Connection]:
    """The prefill's shape (one detection in ten active) and a drain's (most of them)."""
    conn = await db.connect(database_url)
    try:
        await seed(conn, request.param)
        yield conn
    finally:
        await conn.close()


def _literal(value: Any) -> str:
    """A parameter as an untyped SQL literal (the prepared statement's types apply)."""
    if value is None:
        return "NULL"
    if isinstance(value, list):
        items = ",".join("NULL" if v is None else json.dumps(str(v)) for v in value)
        return "'{" + items.replace("'", "''") + "}'"
    return "'" + str(value).replace("'", "''") + "'"


def _hot_queries() -> dict[str, dict[str, Any]]:
    """Every query a batch (and the relay) runs, with a batch's worth of parameters."""
    sessions = [f"s-{n}" for n in range(10, 10 * BATCH + 10, 10)]  # live ones
    spokes = [f"spoke-{int(s[2:]) % 20}" for s in sessions]
    now = datetime.now(UTC).isoformat()
    active = [f"d-{n}" for n in range(10, 10 * BATCH + 10, 10)]
    keys = [f"resolved-{n}" for n in range(1, BATCH + 1)] + [f"new-{n}" for n in range(BATCH)]
    events = [str(uuid4()) for _ in range(BATCH)]
    n = BATCH
    new = [str(uuid4()) for _ in range(n)]
    return {
        "batch_start": {
            "event_ids": events,
            "id": [*sessions[:50], *(f"n-{i}" for i in range(50))],
            "spoke_id": spokes,
        },
        "batch_detections": {
            "session_ids": sessions,
            "dedup_key": keys,
            "stalls_of": sessions[5:],
            "stall_type": "SESSION_STALL",
            "all_of": sessions[:5],
        },
        "write_batch": {
            "ledger": events,
            "spoke_id": sorted(set(spokes)),
            "workspace_id": ["w-1"],
            "task_id": ["t-1"],
            "parent_id": [f"p-{i}" for i in range(5)],
            "s_id": sessions,
            "s_spoke_id": spokes,
            "s_status": ["active"] * n,
            "s_last_activity_at": [now] * n,
            "s_ended_at": [None] * n,
            "s_archived_at": [None] * n,
            "s_metadata": ['{"k": 1}'] * n,
            "m_id": [f"m-{s[2:]}" for s in sessions],
            "m_session_id": sessions,
            "m_spoke_id": spokes,
            "m_workspace_id": [None] * n,
            "m_parent_session_id": [None] * n,
            "m_task_id": [None] * n,
            "m_task": [None] * n,
            "m_status": ["completed"] * n,
            "m_metadata": [None] * n,
            "m_created_at": [now] * n,
            "m_updated_at": [now] * n,
            "d_id": active,
            "d_severity": ["high"] * n,
            "d_details": ['{"n": 2}'] * n,
            "d_occurrence_count": [2] * n,
            "d_updated_at": [now] * n,
            "d_resolved_at": [None] * n,
            "d_resolved_by": [None] * n,
            "d_resolution": [None] * n,
            "n_id": new,
            "n_session_id": sessions,
            "n_anomaly_type": ["model_degradation"] * n,
            "n_severity": ["low"] * n,
            "n_details": ["{}"] * n,
            "n_dedup_key": [f"new-{i}" for i in range(n)],
            "n_occurrence_count": [1] * n,
            "n_created_at": [now] * n,
            "n_updated_at": [now] * n,
            "n_resolved_at": [None] * n,
            "n_resolved_by": [None] * n,
            "n_resolution": [None] * n,
            "o_event_id": new,
            "o_subject": ["x.y"] * n,
            "o_payload": [""] * n,
            "o_aggregate": new,
        },
        "enqueue_outbox": {
            "event_id": new,
            "subject": ["x.y"] * n,
            "payload": [""] * n,
            "aggregate": new,
        },
        "pending_outbox": {"limit": 1000},
        "delete_outbox": {"ids": list(range(1, n + 1))},
        # Not per batch, but over the whole ledger: with nothing old enough it must
        # read nothing, not the ledger (the retention's default age, 1,000 rows).
        "purge_ledger": {"older_than_seconds": 604_800, "batch": 1000},
    }


def _problems(node: dict[str, Any], keys: int, limited: bool = False) -> list[str]:
    found = []
    relation = node.get("Relation Name")
    kind = node["Node Type"]
    if kind in ("Gather", "Gather Merge"):
        # Parallel workers for a batch: the planner expects to read far too much.
        found.append(f"{kind}: a parallel plan")
    if relation in SEEDED:
        expected = node.get("Plan Rows", 0)
        if kind != "Seq Scan" and not limited and expected > keys * 10 + SLACK_ROWS:
            found.append(f"{kind} on {relation} expected to read {expected} rows")
        read = node.get("Actual Rows", 0) * node.get("Actual Loops", 1) + node.get(
            "Rows Removed by Filter", 0
        )
        if kind == "Seq Scan":
            found.append(f"Seq Scan on {relation}")
        elif kind in ("Index Scan", "Index Only Scan", "Bitmap Heap Scan"):
            if kind != "Bitmap Heap Scan" and "Index Cond" not in node and not limited:
                # (Under a LIMIT, a walk in the index's order: pending_outbox's oldest.)
                found.append(f"{kind} of {node.get('Index Name')} without a condition")
            elif read > keys * 10 + SLACK_ROWS:
                found.append(
                    f"{kind} on {relation} ({node.get('Index Name', 'bitmap')}) "
                    f"read {read} rows for {keys} keys"
                )
    if kind == "Bitmap Index Scan" and node.get("Actual Rows", 0) > keys * 10 + SLACK_ROWS:
        # E.g. every active detection of the hub, ANDed with the batch's sessions after.
        found.append(f"Bitmap Index Scan of {node['Index Name']} read {node['Actual Rows']} rows")
    for child in node.get("Plans", []):
        # Under a LIMIT the scan's estimate is before the limit.
        found.extend(_problems(child, keys, limited or kind == "Limit"))
    return found


async def prepare_hot(conn: asyncpg.Connection) -> dict[str, str]:
    """Every hot query prepared as `hot_<name>`, planned generic: the arguments of each."""
    q = db.queries()
    await conn.execute("SET plan_cache_mode = force_generic_plan")
    arguments = {}
    for name, params in _hot_queries().items():
        query: db.Query = getattr(q, name)
        await conn.execute(f"PREPARE hot_{name} AS {query.sql.rstrip().rstrip(';')}")
        arguments[name] = ", ".join(_literal(p) for p in query.args(**params))
    return arguments


async def explain_hot(conn: asyncpg.Connection, arguments: dict[str, str]) -> dict[str, list[str]]:
    """Per prepared hot query, what is wrong with its plan when run (empty: nothing).
    The first run plans it; later runs reuse that plan until something invalidates it."""
    found: dict[str, list[str]] = {}
    for name, args in arguments.items():
        tr = conn.transaction()
        await tr.start()
        try:
            plan = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE hot_{name}({args})")
        finally:
            await tr.rollback()
        found[name] = _problems(json.loads(plan)[0]["Plan"], BATCH * 2)
    return found


async def plan_problems(conn: asyncpg.Connection) -> dict[str, list[str]]:
    """Per hot query, what is wrong with its generic plan on the tables as they are."""
    arguments = await prepare_hot(conn)
    found = await explain_hot(conn, arguments)
    for name in arguments:
        await conn.execute(f"DEALLOCATE hot_{name}")
    return found


@pytest.mark.parametrize("analyzed", [False, True], ids=["no-statistics", "analyzed"])
async def test_hot_queries_read_only_the_batchs_rows(
    seeded: asyncpg.Connection, analyzed: bool
) -> None:
    if analyzed:
        await seeded.execute("ANALYZE")
    problems = {name: p for name, p in (await plan_problems(seeded)).items() if p}
    assert problems == {}


@pytest.mark.parametrize("active_tenths", [1, 7], ids=["10%-active", "70%-active"])
async def test_plans_made_while_the_tables_were_empty_still_read_only_the_batchs_rows(
    database_url: str, active_tenths: int
) -> None:
    """A young hub. A lane's connection keeps its prepared statements, and their generic
    plans, until something invalidates them (an ANALYZE, which autovacuum runs only
    once a table has grown by a tenth, at most every `autovacuum_naptime`). Planned on
    empty tables, the hot queries then run on full ones. The connection the lanes and
    leaders use (`db.plan_by_keys`) passes; a plain one, the control, must not."""
    tables = ", ".join(sorted(SEEDED))
    found = {}
    for by_keys in (False, True):
        conn = await db.connect(database_url, by_keys=by_keys)
        try:
            # Empty again, with no pages; and no ANALYZE (autovacuum's) to replan meanwhile.
            await conn.execute(f"TRUNCATE {tables} CASCADE")
            for table in SEEDED:
                await conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = off)")
            arguments = await prepare_hot(conn)
            await explain_hot(conn, arguments)  # planned now, on empty tables
            await seed(conn, active_tenths)
            found[by_keys] = {n: p for n, p in (await explain_hot(conn, arguments)).items() if p}
        finally:
            await conn.close()
    assert found[False], "plans made on empty tables scanned nothing: the check is blind"
    assert found[True] == {}


async def test_every_lane_and_leader_connects_to_plan_by_keys(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the test above relies on: the connections the lanes and the leaders (the
    relay, the stall sweep, the maintenance) run their statements on are
    `db.connect(by_keys=True)`'s."""
    by_keys: list[str] = []
    plan_by_keys = db.plan_by_keys

    async def recorded(conn: asyncpg.Connection) -> None:
        await plan_by_keys(conn)
        by_keys.append(conn.get_settings().application_name)

    monkeypatch.setattr(db, "plan_by_keys", recorded)
    worker = await hub.start_worker()
    manager = worker.lane_manager
    assert manager is not None
    roles = [lane.durable for lane in manager.lanes.values()] + ["relay", "sweep", "maintenance"]
    wanted = {role: manager.application_name(role) + "@" for role in roles}

    async def all_connected() -> bool:
        return all(any(n.startswith(w) for n in by_keys) for w in wanted.values())

    await wait_until(all_connected, what=f"connections planning by keys: {wanted}")


async def test_without_the_hot_path_indexes_the_plan_check_fails(
    seeded: asyncpg.Connection,
) -> None:
    """The negative control: the indexes before migration 0008."""
    await seeded.execute(
        """
        DROP INDEX idx_detections_active_by_session;
        DROP INDEX idx_detections_resolved_by_key;
        CREATE INDEX idx_detections_resolved_at ON detections (resolved_at);
        CREATE INDEX idx_detections_dedup_key ON detections (dedup_key);
        """
    )
    problems = await plan_problems(seeded)
    await seeded.execute("ANALYZE")
    analyzed = await plan_problems(seeded)
    bad = {
        name: found
        for name, found in (*problems.items(), *analyzed.items())
        if found and name == "batch_detections"
    }
    assert bad, "the plan check passed the pre-0008 indexes"


async def test_the_ledger_purge_deletes_the_oldest_rows_past_the_age(database_url: str) -> None:
    """purge_ledger was rewritten to stay on its indexes: it still deletes what it should."""
    conn = await db.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO processed_events (event_id, processed_at) "
            "SELECT gen_random_uuid(), now() - make_interval(hours => g) "
            "FROM generate_series(1, 10) AS g"
        )
        assert await db.purge_ledger(conn, 3.5 * 3600, 2) == 2
        oldest = await conn.fetchval("SELECT min(processed_at) FROM processed_events")
        assert oldest > await conn.fetchval("SELECT now() - interval '8 hours 30 minutes'")
        assert await db.purge_ledger(conn, 3.5 * 3600, 100) == 5
        assert await db.purge_ledger(conn, 3.5 * 3600, 100) == 0
        assert await conn.fetchval("SELECT count(*) FROM processed_events") == 3
    finally:
        await conn.close()
