"""Batches of sessions that keep many active detections: what a batch costs as they pile up.

    python bench/long_lived.py                              # 5, 100 and 400 per session
    python bench/long_lived.py --worker-root /tmp/base      # beside another checkout

A session that lives for days keeps one active detection per anomaly type and
fingerprint it raised and nobody resolved. Ten such sessions get `--active` each;
then 400 batches of ten events (five heartbeats, five signals of one key) go through
`worker.effects.apply_batch` in their own transactions, on one connection planned
as a lane's (by keys), on an embedded PostgreSQL. Reported per batch: the
PostgreSQL backend's CPU (/proc/<pid>/stat) and the wall time. Each checkout runs in
a process of its own (its `worker` package), on a database of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "hub"
SESSIONS = [f"s{n}" for n in range(10)]
BATCHES = 400


def backend_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(dsn: str, active: int) -> tuple[float, float]:
    """(PostgreSQL CPU ms, wall ms) per batch, with the `worker` on sys.path."""
    from worker import db, schema
    from worker.effects import apply_batch
    from worker.intake import Intake, decode

    def event(session: str, what: str, **fields: object) -> Intake:
        body = {
            "eventId": str(uuid.uuid4()),
            "occurredAt": "2026-12-03T12:00:00Z",
            "spokeId": "sp1",
            "sessionId": session,
            **fields,
        }
        subject = f"{PREFIX}.spoke.sp1.session.{session}.{what}"
        return decode(PREFIX, subject, json.dumps(body).encode())

    conn = await db.connect(dsn)
    await schema.migrate(conn)
    await conn.close()
    conn = await db.connect(dsn, by_keys=True)
    try:
        async with conn.transaction():
            await apply_batch(conn, PREFIX, [event(s, "spawned") for s in SESSIONS])
        for session in SESSIONS:
            for start in range(0, active, 100):
                signals = [
                    event(session, "signal.model_degradation", severity="low", fingerprint=f"f{n}")
                    for n in range(start, min(active, start + 100))
                ]
                async with conn.transaction():
                    await apply_batch(conn, PREFIX, signals)
        await conn.execute("ANALYZE")
        pid = conn.get_server_pid()
        cpu, started = backend_cpu_seconds(pid), time.perf_counter()
        for n in range(BATCHES):
            sessions = [SESSIONS[(n + k) % len(SESSIONS)] for k in range(5)]
            batch = [event(s, "heartbeat") for s in sessions] + [
                event(s, "signal.high_error_count", severity="low", fingerprint="x")
                for s in sessions
            ]
            async with conn.transaction():
                await apply_batch(conn, PREFIX, batch)
        wall = time.perf_counter() - started
        return (
            1000 * (backend_cpu_seconds(pid) - cpu) / BATCHES,
            1000 * wall / BATCHES,
        )
    finally:
        await conn.close()


def child(root: str, dsn: str, active: int) -> None:
    sys.path.insert(0, root)
    print(json.dumps(asyncio.run(measure(dsn, active))))


async def create_database(dsn: str) -> str:
    import asyncpg

    name = f"long_lived_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    return dsn.rsplit("/", 1)[0] + "/" + name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--active", type=int, action="append", help="per session (repeatable)")
    parser.add_argument("--worker-root", help="another checkout, measured beside this one")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    sys.path.insert(0, str(ROOT))
    from worker.embedded import EmbeddedPostgres

    roots = [str(ROOT)] + ([args.worker_root] if args.worker_root else [])
    with tempfile.TemporaryDirectory(prefix="hub-long-lived-") as scratch:
        postgres = EmbeddedPostgres(Path(scratch) / "postgres")
        dsn = postgres.start()
        try:
            print(f"{'active/session':>15}  {'PG ms/batch':>12}  {'wall ms/batch':>14}  worker")
            for active in args.active or [5, 100, 400]:
                for root in roots:
                    database = asyncio.run(create_database(dsn))
                    out = subprocess.run(
                        [sys.executable, __file__, "--child", root, database, str(active)],
                        check=True,
                        capture_output=True,
                        text=True,
                    ).stdout
                    pg_ms, wall_ms = json.loads(out.strip().splitlines()[-1])
                    print(f"{active:>15}  {pg_ms:>12.3f}  {wall_ms:>14.3f}  {root}", flush=True)
        finally:
            postgres.stop()
            # As root the server's data may live outside `scratch` (worker.embedded).
            shutil.rmtree(postgres.data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
