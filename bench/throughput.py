"""Throughput and latency of hub-worker: the batched worker beside its per-message mode.

    python bench/throughput.py --events 200000 --baseline-events 20000
    python bench/throughput.py --rate 1000 --seconds 20          # latency at an offered rate

Starts an embedded NATS and PostgreSQL (or uses HUB_NATS_URL / HUB_DATABASE_URL,
the latter a role that may CREATE DATABASE), generates a realistic mix of spoke
events, and runs `hub-worker run` as a child process once per mode, each on
its own database and subject prefix, with the same events:

- drain: the events are published first (a backlog), then the worker starts;
  events/s is counted from the first applied event until every event is in the
  ledger and every outbound event has been published by the relay;
- rate: the worker runs, events are published at a steady rate, and latency is
  measured per inbound event from its publish to the arrival of the first
  outbound event it caused (bench/latency.py, which also runs on its own).

Peak RSS is the worker's VmHWM, CPU seconds its user+system time.

Every drain also reports, over the drain's window (first applied event to the
last outbound event published):
- CPU ms per event of the worker, of PostgreSQL (the postmaster and all its
  children: /proc/<pid>/stat utime+stime, plus what exited backends left in the
  postmaster's cutime+cstime) and of nats-server (embedded servers only);
- the raw ceiling: a bare nats-py fetch(500)+ack loop over the same messages,
  right after the drain, on the same servers;
- steal: cores the hypervisor took over the window; w.ran and w.queued: the
  shares of the window the worker ran and was ready to run but waited for a core
  (/proc schedstat), which tell a worker bound by its own loop (ran near 1) from
  one that shares two cores with PostgreSQL and nats-server (ran + queued near 1);
- the top statements by total time (pg_stat_statements, loaded into the
  benchmark's own PostgreSQL with shared_preload_libraries), named after the
  `-- name:` blocks of sql/queries.

--prefill seeds the database first (the issue's 1,000,000 detections, 10 %
active, 200,000 sessions and 5,000,000 ledger rows, times --prefill-scale) and
drains the same events on it twice, without and with ANALYZE.
--worker-root runs another checkout's worker (e.g. main, for a baseline).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID, uuid4

import asyncpg
import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from worker.config import DEFAULT_BATCH_MAX  # noqa: E402
from worker.db import Query  # noqa: E402
from worker.embedded import EmbeddedNats, EmbeddedPostgres  # noqa: E402
from worker.ids import uuid7  # noqa: E402
from worker.subjects import inbound_subject  # noqa: E402

SEVERITIES = ("low", "low", "low", "medium", "medium", "high")
KINDS = ("model_degradation", "high_error_count")


@dataclass
class Event:
    session: str
    tail: str  # what follows "P.spoke.<spoke>.session.<session>."
    body: dict[str, object]


def generate(count: int, seed: int = 1, event_ids: Callable[[], UUID] = uuid7) -> list[Event]:
    """Per 100 events: ~70 signals repeating over ~1,000 active keys, ~10 signals
    opening new keys, ~20 lifecycle events over ~2,000 sessions, each session
    going spawned -> started -> heartbeats -> completed/failed -> archived in order.
    `event_ids` makes each eventId: version 7 (time-ordered) as the spoke client
    sends them, or uuid4 as a spoke of its own might."""
    rng = random.Random(seed)
    events: list[Event] = []
    alive: list[str] = []
    next_step: dict[str, int] = {}
    hot: list[tuple[str, str, str]] = []  # (session, kind, fingerprint)
    made = 0

    while len(events) < count:
        roll = rng.random()
        if roll < 0.2 or len(alive) < 50:
            if len(alive) < 2000 and (rng.random() < 0.25 or not alive):
                made += 1
                session = f"sess-{made}"
                alive.append(session)
                next_step[session] = 0
            session = rng.choice(alive)
            step = next_step[session]
            next_step[session] += 1
            if step == 0:
                events.append(
                    Event(session, "spawned", body(session, event_ids(), task=f"task {session}"))
                )
            elif step == 1:
                events.append(Event(session, "started", body(session, event_ids())))
            elif step < 6:
                events.append(Event(session, "heartbeat", body(session, event_ids())))
            elif step == 6:
                end = rng.choice(["completed", "completed", "failed"])
                events.append(Event(session, end, body(session, event_ids(), reason="done")))
            else:
                events.append(Event(session, "archived", body(session, event_ids())))
                alive.remove(session)
                hot = [k for k in hot if k[0] != session]
        elif roll < 0.3 or len(hot) < 1000:
            key = (rng.choice(alive), rng.choice(KINDS), uuid4().hex[:8])
            hot.append(key)
            if len(hot) > 1000:
                hot.pop(0)
            events.append(signal_event(key, rng, event_ids()))
        else:
            events.append(signal_event(rng.choice(hot), rng, event_ids()))
    return events


def body(session: str, event_id: UUID, **extra: object) -> dict[str, object]:
    return {
        "eventId": str(event_id),
        "occurredAt": datetime.now(UTC).isoformat(),
        "spokeId": f"spoke-{int(session.rsplit('-', 1)[1]) % 20}",
        "sessionId": session,
        **extra,
    }


def signal_event(key: tuple[str, str, str], rng: random.Random, event_id: UUID) -> Event:
    session, kind, fingerprint = key
    payload = body(
        session,
        event_id,
        severity=rng.choice(SEVERITIES),
        details={"n": rng.randint(1, 99)},
        fingerprint=fingerprint,
    )
    return Event(session, f"signal.{kind}", payload)


def subject(prefix: str, event: Event) -> str:
    return inbound_subject(prefix, event.body["spokeId"], event.session, event.tail)


async def publish(js: object, prefix: str, events: list[Event], window: int = 1000) -> None:
    """Publish in stream order, awaiting acks in windows (order is the call order)."""
    for start in range(0, len(events), window):
        chunk = events[start : start + window]
        await asyncio.gather(
            *(
                js.publish(  # type: ignore[attr-defined]
                    subject(prefix, e),
                    json.dumps(e.body).encode(),
                    headers={"Nats-Msg-Id": str(e.body["eventId"])},
                )
                for e in chunk
            )
        )


@dataclass
class Result:
    mode: str
    events: int
    seconds: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    peak_rss_mb: float = 0.0
    cpu_seconds: float = 0.0
    # Over the drain's window: events applied in it and CPU seconds per process.
    window_events: int = 0
    cpu: dict[str, float] = field(default_factory=dict)
    raw_rate: float = 0.0
    steal: float = 0.0  # cores stolen by the hypervisor over the window
    # Shares of the window the worker ran, and was ready to run but waited for a core.
    worker_ran: float = 0.0
    worker_queued: float = 0.0
    statements: list[Statement] = field(default_factory=list)
    batches: int = 0
    # (wait, statement) -> samples of a worker backend, and the samples taken.
    waits: Counter[tuple[str, str]] = field(default_factory=Counter)
    wait_samples: int = 0
    timeline: list[Moment] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    def cpu_ms_per_event(self, process: str) -> float:
        return self.cpu[process] * 1000 / self.window_events if self.window_events else 0.0


@dataclass
class Moment:
    """One sample of `--timeline`: where the drain is, and who is busy."""

    at: float  # seconds into the drain's window
    waiting: list[int]  # per lane: messages not yet acked (pending + ack pending)
    outbox: int
    backends: Counter[str]  # the worker's backends by state (active, idle in transaction)
    cores: dict[str, float]  # CPU of each process since the sample before, in cores


@dataclass
class Statement:
    name: str
    calls: int
    total_ms: float
    rows: int

    @property
    def mean_ms(self) -> float:
        return self.total_ms / self.calls if self.calls else 0.0


def _ticks(pid: int) -> tuple[int, int, int]:
    """(ppid, utime+stime, cutime+cstime) of a process, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of one live process."""
    return _ticks(pid)[1] / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of a process and all its children, living or exited (reaped).

    A child that exits between two readings moves its time from the children's
    sum to the parent's cutime+cstime, so the difference of two readings is the
    CPU the whole tree used in between (PostgreSQL: the postmaster and every
    backend, the autovacuum workers, the checkpointer, the WAL writer)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid, own, reaped = _ticks(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
        if int(entry.name) == root or ppid == root:
            total += own + reaped
    return total / os.sysconf("SC_CLK_TCK")


def run_delay_seconds(pid: int) -> float:
    """Seconds a process's threads were ready to run and waited for a core, since each
    started (/proc/<pid>/task/<tid>/schedstat: on-CPU ns, waiting ns, timeslices)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return total / 1e9


def proc_stats(pid: int) -> tuple[float, float]:
    """(peak RSS in MB, CPU seconds) of a live process."""
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            rss = int(line.split()[1]) / 1024
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss, (int(fields[11]) + int(fields[12])) / ticks


class Stage:
    """One mode's worker: its database, prefix and child process."""

    def __init__(
        self,
        admin_dsn: str,
        nats_url: str,
        mode: str,
        batch_max: int,
        workers: int = 1,
        worker_root: Path = ROOT,
        template: str | None = None,
    ) -> None:
        self.mode = mode
        self.prefix = f"bench{uuid4().hex[:6]}"
        self.database = f"bench_{uuid4().hex[:8]}"
        self.admin_dsn = admin_dsn
        self.dsn = urlunsplit(urlsplit(admin_dsn)._replace(path=f"/{self.database}"))
        self.nats_url = nats_url
        self.batch_max = batch_max
        self.workers = workers
        self.worker_root = worker_root
        self.template = template
        self.processes: list[subprocess.Popen[bytes]] = []
        self.log = Path(tempfile.mkstemp(prefix=f"bench-{mode}-", suffix=".log")[1])

    async def create(self) -> None:
        admin = await asyncpg.connect(self.admin_dsn)
        template = f' TEMPLATE "{self.template}"' if self.template else ""
        await admin.execute(f'CREATE DATABASE "{self.database}"{template}')
        await admin.close()

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "HUB_NATS_URL": self.nats_url,
            "HUB_DATABASE_URL": self.dsn,
            "HUB_SUBJECT_PREFIX": self.prefix,
            "HUB_BATCH_MAX": str(self.batch_max),
            "HUB_HTTP_ADDR": os.environ.get("BENCH_HTTP_ADDR", ""),
            "HUB_LOG_FORMAT": "json",
            "PYTHONPATH": str(self.worker_root),
        }

    def worker_cpu_seconds(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.processes)

    def worker_run_delay(self) -> float:
        return sum(run_delay_seconds(p.pid) for p in self.processes)

    def start(self) -> None:
        env = self.env()
        with self.log.open("ab") as out:
            self.processes = [
                subprocess.Popen(
                    [sys.executable, "-m", "worker", "run"],
                    env=env,
                    # `-m` puts the working directory first on sys.path.
                    cwd=self.worker_root,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
                for _ in range(self.workers)
            ]

    def stop(self) -> tuple[float, float]:
        """(the largest peak RSS, the summed CPU seconds) of the workers, then stop them."""
        stats = [proc_stats(p.pid) for p in self.processes]
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            process.wait(timeout=60)
        return max(s[0] for s in stats), sum(s[1] for s in stats)

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()

    async def drop(self) -> None:
        admin = await asyncpg.connect(self.admin_dsn)
        await admin.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        await admin.close()


@dataclass
class Servers:
    nats_url: str
    admin_dsn: str
    nats_pid: int | None = None  # embedded servers only: their CPU is measured
    postmaster_pid: int | None = None
    statements: bool = False  # pg_stat_statements is loaded

    def cpu(self) -> dict[str, float]:
        found = {}
        if self.postmaster_pid is not None:
            found["postgres"] = tree_cpu_seconds(self.postmaster_pid)
        if self.nats_pid is not None:
            found["nats-server"] = cpu_seconds(self.nats_pid)
        return found


@contextmanager
def servers() -> Iterator[Servers]:
    """HUB_NATS_URL / HUB_DATABASE_URL, or embedded servers for what is not given
    (BENCH_PG_OPTIONS: extra PostgreSQL settings as JSON). The embedded PostgreSQL
    preloads pg_stat_statements."""
    scratch = Path(tempfile.mkdtemp(prefix="hub-bench-"))
    started: list[EmbeddedNats | EmbeddedPostgres] = []
    try:
        nats_url = os.environ.get("HUB_NATS_URL")
        nats_pid = postmaster_pid = None
        if not nats_url:
            embedded_nats = EmbeddedNats(scratch / "nats")
            nats_url = embedded_nats.start()
            started.append(embedded_nats)
            assert embedded_nats.process is not None
            nats_pid = embedded_nats.process.pid
        admin_dsn = os.environ.get("HUB_DATABASE_URL")
        if not admin_dsn:
            extra = json.loads(os.environ.get("BENCH_PG_OPTIONS", "{}"))
            embedded_pg = EmbeddedPostgres(
                scratch / "postgres",
                options={
                    "max_connections": "200",
                    "shared_preload_libraries": "pg_stat_statements",
                    "pg_stat_statements.max": "2000",
                    **extra,
                },
            )
            admin_dsn = embedded_pg.start()
            started.append(embedded_pg)
            pid_file = embedded_pg.data_dir / "postmaster.pid"
            postmaster_pid = int(pid_file.read_text().split()[0])
        yield Servers(nats_url, admin_dsn, nats_pid, postmaster_pid)
    finally:
        for server in reversed(started):
            server.stop()
            # As root the server's data may live outside `scratch` (worker.embedded).
            if isinstance(server, EmbeddedPostgres):
                shutil.rmtree(server.data_dir, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)


async def enable_statements(srv: Servers) -> None:
    admin = await asyncpg.connect(srv.admin_dsn)
    try:
        await admin.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await admin.fetchval("SELECT count(*) FROM pg_stat_statements")
        srv.statements = True
    except asyncpg.PostgresError as err:
        print(f"pg_stat_statements unavailable ({err}): no statement table", flush=True)
    finally:
        await admin.close()


def _normal(text: str) -> str:
    return " ".join(text.split()).rstrip(";")


def _as_sent(name: str, text: str) -> str:
    """A block as the server gets it: `:name` parameters become `$n` (as worker.db loads
    them); an older checkout's blocks are written with `$n` already."""
    try:
        return Query.parse(name, text).sql
    except RuntimeError:
        return text


def query_names(worker_root: Path) -> list[tuple[str, str]]:
    """(normalised text, name) of every `-- name:` block of a checkout's sql/queries."""
    found = []
    for path in sorted((worker_root / "sql" / "queries").glob("*.sql")):
        name = None
        lines: list[str] = []
        for line in [*path.read_text().splitlines(), "-- name: _end"]:
            if line.startswith("-- name:"):
                if name is not None:
                    found.append((_normal(_as_sent(name, "\n".join(lines))), name))
                name, lines = line.split(":", 1)[1].strip(), []
            elif not line.startswith("--"):
                lines.append(line)
    return found


async def top_statements(
    srv: Servers, database: str, worker_root: Path, limit: int = 10
) -> list[Statement]:
    admin = await asyncpg.connect(srv.admin_dsn)
    try:
        rows = await admin.fetch(
            "SELECT query, calls, total_exec_time, rows FROM pg_stat_statements "
            "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = $1) "
            "ORDER BY total_exec_time DESC",
            database,
        )
    finally:
        await admin.close()
    names = query_names(worker_root)
    return [
        Statement(statement_name(names, r["query"]), r["calls"], r["total_exec_time"], r["rows"])
        for r in rows
    ]


def statement_name(names: list[tuple[str, str]], query: str) -> str:
    """The `-- name:` of a statement's text as the server reports it, else its start."""
    text = _normal(query)
    name = next((n for body, n in names if body == text), None) or next(
        (n for body, n in names if body and text.startswith(body[:80])), None
    )
    return name or text[:40]


async def reset_statements(srv: Servers) -> None:
    if srv.statements:
        admin = await asyncpg.connect(srv.admin_dsn)
        await admin.execute("SELECT pg_stat_statements_reset()")
        await admin.close()


async def wait_for_streams(js: object, prefix: str) -> None:
    stream = f"{prefix.upper()}_EVENTS"
    for _ in range(600):
        try:
            infos = await js.consumers_info(stream)  # type: ignore[attr-defined]
            if infos:
                return
        except Exception:
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError("the worker did not create its streams")


async def outstanding(js: object, stream: str) -> int | None:
    """Messages of the stream not yet acked by the worker's lane consumers."""
    try:
        infos = await js.consumers_info(stream)  # type: ignore[attr-defined]
    except Exception:
        return None
    lanes = [i for i in infos if not i.name.startswith("raw")]
    if not lanes:
        return None
    return sum(i.num_pending + i.num_ack_pending for i in lanes)


async def raw_ceiling(js: object, stream: str, count: int) -> float:
    """msgs/s of a bare fetch(500)+ack loop over the stream's first `count` messages."""
    name = f"raw{uuid4().hex[:6]}"
    await js.add_consumer(  # type: ignore[attr-defined]
        stream,
        ConsumerConfig(
            durable_name=name,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            max_ack_pending=10_000,
        ),
    )
    sub = await js.pull_subscribe_bind(durable=name, stream=stream)  # type: ignore[attr-defined]
    got = 0
    began = time.perf_counter()
    try:
        while got < count:
            msgs = await sub.fetch(500, timeout=5)
            for msg in msgs:
                await msg.ack()
            got += len(msgs)
        return got / (time.perf_counter() - began)
    finally:
        await sub.unsubscribe()
        await js.delete_consumer(stream, name)  # type: ignore[attr-defined]


WAITS_SQL = """
SELECT coalesce(wait_event_type || ':' || wait_event, 'on CPU') AS wait, query
FROM pg_stat_activity
WHERE datname = $1 AND state = 'active' AND backend_type = 'client backend'
  AND application_name LIKE 'hub-worker%'
"""


async def sample_waits(
    srv: Servers, database: str, worker_root: Path, result: Result, stop: asyncio.Event
) -> None:
    """Every 10 ms, what each busy worker backend waits on and in which statement: where
    statement time (pg_stat_statements' total, which includes waits) is not CPU."""
    names = query_names(worker_root)
    admin = await asyncpg.connect(srv.admin_dsn)
    try:
        while not stop.is_set():
            for r in await admin.fetch(WAITS_SQL, database):
                result.waits[(r["wait"], statement_name(names, r["query"]))] += 1
            result.wait_samples += 1
            await asyncio.sleep(0.01)
    finally:
        await admin.close()


BACKENDS_SQL = """
SELECT state, count(*) AS n FROM pg_stat_activity
WHERE datname = $1 AND backend_type = 'client backend' AND application_name LIKE 'hub-worker%'
GROUP BY state
"""


def process_cpu(srv: Servers, stage: Stage) -> dict[str, float]:
    """CPU seconds so far of the worker(s), PostgreSQL and nats-server, by process."""
    return {"worker": stage.worker_cpu_seconds(), **srv.cpu()}


async def sample_timeline(
    srv: Servers, stage: Stage, js: object, stream: str, result: Result, stop: asyncio.Event
) -> None:
    """Every 100 ms: each lane's backlog, the outbox, the worker's backends by state
    and the cores each process used. Where a drain that does not fill the cores waits."""
    admin = await asyncpg.connect(srv.admin_dsn)
    conn = await asyncpg.connect(stage.dsn)
    started = time.perf_counter()
    before, then = process_cpu(srv, stage), started
    try:
        while not stop.is_set():
            await asyncio.sleep(0.1)
            try:
                infos = await js.consumers_info(stream)  # type: ignore[attr-defined]
            except Exception:
                continue
            waiting = [
                i.num_pending + i.num_ack_pending
                for i in sorted(infos, key=lambda i: i.name)
                if not i.name.startswith("raw")
            ]
            outbox = await conn.fetchval("SELECT count(*) FROM outbox")
            backends = Counter(
                {r["state"]: r["n"] for r in await admin.fetch(BACKENDS_SQL, stage.database)}
            )
            now, after = time.perf_counter(), process_cpu(srv, stage)
            cores = {k: (after[k] - before[k]) / (now - then) for k in after}
            result.timeline.append(Moment(now - started, waiting, outbox, backends, cores))
            before, then = after, now
    finally:
        await conn.close()
        await admin.close()


async def drain(
    srv: Servers,
    mode: str,
    batch_max: int,
    events: list[Event],
    workers: int = 1,
    worker_root: Path = ROOT,
    template: str | None = None,
    analyze: bool = False,
    waits: bool = False,
    timeline: bool = False,
) -> Result:
    stage = Stage(srv.admin_dsn, srv.nats_url, mode, batch_max, workers, worker_root, template)
    await stage.create()
    nc = await nats.connect(srv.nats_url)
    js = nc.jetstream(timeout=30)
    stream = f"{stage.prefix.upper()}_EVENTS"
    try:
        conn = await asyncpg.connect(stage.dsn)
        if template is not None:
            # A copy of the prefilled database: no statistics unless analysed here.
            for table in ("sessions", "detections", "processed_events", "mappings"):
                await conn.execute(f"ALTER TABLE {table} RESET (autovacuum_enabled)")
            if analyze:
                await conn.execute("ANALYZE")
        # Create the streams with a first short run, then publish the backlog.
        stage.start()
        await wait_for_streams(js, stage.prefix)
        stage.stop()
        await publish(js, stage.prefix, events)
        first_ids = [str(e.body["eventId"]) for e in events[:2000]]
        all_ids = [str(e.body["eventId"]) for e in events]
        await reset_statements(srv)
        stage.start()
        first_applied = "SELECT EXISTS (SELECT 1 FROM processed_events WHERE event_id = ANY($1))"
        while True:  # polling another process's progress
            if await conn.fetchval(first_applied, first_ids):
                break
            await asyncio.sleep(0.005)
        started = time.perf_counter()
        before = process_cpu(srv, stage)
        _, stolen_before = machine_seconds()
        queued_before = stage.worker_run_delay()
        result = Result(mode, len(events))
        sampling = asyncio.Event()
        sampler = (
            asyncio.create_task(sample_waits(srv, stage.database, worker_root, result, sampling))
            if waits
            else None
        )
        timeliner = (
            asyncio.create_task(sample_timeline(srv, stage, js, stream, result, sampling))
            if timeline
            else None
        )
        left_at_start = await outstanding(js, stream) or len(events)
        while True:
            await asyncio.sleep(0.05)
            if await outstanding(js, stream) != 0:
                continue
            if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM outbox)"):
                continue
            elapsed = time.perf_counter() - started
            after = process_cpu(srv, stage)
            _, stolen_after = machine_seconds()
            queued_after = stage.worker_run_delay()
            applied = await conn.fetchval(
                "SELECT count(*) FROM processed_events WHERE event_id = ANY($1::uuid[])",
                all_ids,
            )
            if applied >= len(events):
                break
        sampling.set()
        for task in (sampler, timeliner):
            if task is not None:
                await task
        rss, cpu = stage.stop()
        statements = (
            await top_statements(srv, stage.database, worker_root) if srv.statements else []
        )
        batches = next(
            (s.calls for s in statements if s.name in ("transaction_now", "batch_start")), 0
        )
        await conn.close()
        raw = await raw_ceiling(js, stream, len(events))
        result.seconds, result.peak_rss_mb, result.cpu_seconds = elapsed, rss, cpu
        result.window_events = left_at_start
        result.cpu = {k: after[k] - before[k] for k in after}
        result.raw_rate, result.statements, result.batches = raw, statements, batches
        result.steal = (stolen_after - stolen_before) / elapsed
        workers = max(1, len(stage.processes))
        result.worker_ran = result.cpu["worker"] / elapsed / workers
        result.worker_queued = (queued_after - queued_before) / elapsed / workers
        return result
    finally:
        stage.kill()
        await nc.close()
        await stage.drop()


PREFILL_SQL = """
INSERT INTO spokes (id) SELECT 'pre-spoke-' || g FROM generate_series(0, 19) AS g;
INSERT INTO sessions (id, spoke_id, status, last_activity_at, ended_at, archived_at)
SELECT 'pre-sess-' || g, 'pre-spoke-' || (g % 20),
       CASE WHEN g % 10 = 0 THEN 'active' ELSE 'completed' END,
       now() - make_interval(secs => g % 86400),
       CASE WHEN g % 10 = 0 THEN NULL ELSE now() - make_interval(secs => g % 86400) END,
       CASE WHEN g % 10 < 7 AND g % 10 <> 0 THEN now() - make_interval(secs => g % 86400) END
FROM generate_series(1, $1::int) AS g;
INSERT INTO mappings (id, session_id, spoke_id, status)
SELECT 'pre-map-' || g, 'pre-sess-' || g, 'pre-spoke-' || (g % 20),
       CASE WHEN g % 10 = 0 THEN 'active' ELSE 'completed' END
FROM generate_series(1, $1::int) AS g;
-- One detection in ten active (of an active session), each with its own key;
-- the resolved ones share keys three by three (a key resolved, reopened, resolved).
INSERT INTO detections (id, session_id, anomaly_type, severity, details, dedup_key,
                        occurrence_count, created_at, updated_at, resolved_at, resolution)
SELECT 'pre-det-' || g,
       'pre-sess-' || CASE WHEN g % 10 = 0 THEN (g / 10 % ($1::int / 10)) * 10 + 10
                           ELSE g % $1::int + 1 END,
       'model_degradation', 'low', '{"n": 1}'::jsonb,
       md5(CASE WHEN g % 10 = 0 THEN 'active-' || g ELSE 'resolved-' || (g / 3) END),
       1 + g % 7, now() - interval '2 days', now() - interval '1 day',
       CASE WHEN g % 10 = 0 THEN NULL ELSE now() - make_interval(secs => g % 86400) END,
       CASE WHEN g % 10 = 0 THEN NULL ELSE 'auto_resolved' END
FROM generate_series(1, $2::int) AS g;
INSERT INTO processed_events (event_id, processed_at)
SELECT $4, now() - make_interval(secs => g % 3600)
FROM generate_series(1, $3::int) AS g;
"""


# The ledger's eventIds, of the kind the drained events have: uuidv7() is PostgreSQL
# 18's, its argument shifting the id's time as processed_at is.
PREFILL_EVENT_IDS = {
    "v7": "uuidv7(-make_interval(secs => g % 3600))",
    "v4": "gen_random_uuid()",
}
EVENT_IDS: dict[str, Callable[[], UUID]] = {"v7": uuid7, "v4": uuid4}


async def prefill(srv: Servers, worker_root: Path, scale: float, event_ids: str) -> tuple[str, str]:
    """A migrated database seeded with the issue's rows times `scale`, vacuumed but not
    analysed, autovacuum off on the seeded tables (each copy turns it back on)."""
    name = f"bench_prefill_{uuid4().hex[:6]}"
    admin = await asyncpg.connect(srv.admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    dsn = urlunsplit(urlsplit(srv.admin_dsn)._replace(path=f"/{name}"))
    subprocess.run(  # noqa: ASYNC221 (nothing else runs meanwhile)
        [sys.executable, "-m", "worker", "migrate"],
        env={**os.environ, "HUB_DATABASE_URL": dsn, "PYTHONPATH": str(worker_root)},
        cwd=worker_root,
        check=True,
        capture_output=True,
    )
    sessions, detections, ledger = (
        int(200_000 * scale),
        int(1_000_000 * scale),
        int(5_000_000 * scale),
    )
    began = time.perf_counter()
    conn = await asyncpg.connect(dsn)
    try:
        for table in ("sessions", "detections", "processed_events", "mappings"):
            await conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
        script = PREFILL_SQL
        for placeholder, value in (
            ("$1", str(sessions)),
            ("$2", str(detections)),
            ("$3", str(ledger)),
            ("$4", PREFILL_EVENT_IDS[event_ids]),
        ):
            script = script.replace(placeholder, value)
        await conn.execute(script)
        # VACUUM, not ANALYZE: hint bits and the visibility map set as in a database
        # that has been running (a first read would otherwise write every page),
        # but no column statistics.
        for table in ("sessions", "mappings", "detections", "processed_events"):
            await conn.execute(f"VACUUM {table}")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    summary = (
        f"prefilled {detections} detections ({detections // 10} active), {sessions} sessions, "
        f"{ledger} ledger rows ({event_ids} eventIds) in {time.perf_counter() - began:.0f} s"
    )
    return name, summary


def table(rows: list[Result], title: str, rate_col: bool = True) -> str:
    lines = [
        title,
        f"{'mode':<14}{'events':>9}{'events/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'peak RSS MB':>13}{'CPU s':>8}",
    ]
    for r in rows:
        p50 = f"{r.p50_ms:.1f}" if r.p50_ms is not None else "-"
        p99 = f"{r.p99_ms:.1f}" if r.p99_ms is not None else "-"
        lines.append(
            f"{r.mode:<14}{r.events:>9}{(r.rate if rate_col else r.events / r.seconds):>11.0f}{p50:>9}{p99:>9}"
            f"{r.peak_rss_mb:>13.0f}{r.cpu_seconds:>8.1f}"
        )
    return "\n".join(lines)


def machine_seconds() -> tuple[float, float]:
    """CPU seconds all cores spent busy since boot, and those the hypervisor stole.

    /proc/stat's first line: busy is user, nice, system, irq and softirq (not idle,
    iowait or steal); steal is time this virtual machine was ready to run and another
    guest ran instead.
    """
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields[:7]) - fields[3] - fields[4]) / tick, fields[7] / tick


def cpu_table(rows: list[Result]) -> str:
    lines = [
        "CPU ms per event over each drain's window (first applied event to the last relayed)",
        f"{'mode':<22}{'events':>9}{'events/s':>10}{'raw/s':>8}{'ratio':>7}"
        f"{'worker':>8}{'postgres':>10}{'nats':>7}{'total':>7}{'stmts/batch':>12}{'steal':>7}"
        f"{'w.ran':>7}{'w.queued':>9}",
    ]
    for r in rows:
        worker, pg, ns = (
            r.cpu_ms_per_event(p) if p in r.cpu else float("nan")
            for p in ("worker", "postgres", "nats-server")
        )
        total = sum(r.cpu_ms_per_event(p) for p in r.cpu)
        calls = sum(s.calls for s in r.statements)
        per_batch = f"{calls / r.batches:.1f}" if r.batches else "-"
        lines.append(
            f"{r.mode:<22}{r.window_events:>9}{r.rate:>10.0f}{r.raw_rate:>8.0f}"
            f"{r.rate / r.raw_rate if r.raw_rate else 0:>7.2f}"
            f"{worker:>8.3f}{pg:>10.3f}{ns:>7.3f}{total:>7.3f}{per_batch:>12}{r.steal:>7.2f}"
            f"{r.worker_ran:>7.2f}{r.worker_queued:>9.2f}"
        )
    return "\n".join(lines)


def waits_table(r: Result, limit: int = 12) -> str:
    """Busy worker backends per sample, by what they waited on and in which statement."""
    samples = r.wait_samples or 1
    busy = sum(r.waits.values())
    lines = [
        f"worker backends of {r.mode}: {busy / samples:.2f} busy on average over "
        f"{r.wait_samples} samples (10 ms apart)",
        f"{'wait':<30}{'statement':<34}{'backends':>9}{'share':>7}",
    ]
    for (wait, name), n in r.waits.most_common(limit):
        lines.append(f"{wait[:29]:<30}{name[:33]:<34}{n / samples:>9.3f}{n / (busy or 1):>7.0%}")
    return "\n".join(lines)


def timeline_table(r: Result) -> str:
    lines = [
        f"timeline of {r.mode}: lanes' unacked messages (min / max), outbox rows, "
        "the worker's backends active / idle in a transaction, cores used",
        f"{'s':>5} {'lanes':>12} {'lanes left':>10} {'outbox':>7} {'active':>6} {'in tx':>5}"
        f" {'worker':>6} {'postgres':>8} {'nats':>5} {'total':>5}",
    ]
    for m in r.timeline:
        busy = [n for n in m.waiting if n]
        cores = [m.cores.get(k, 0.0) for k in ("worker", "postgres", "nats-server")]
        lanes = f"{min(m.waiting, default=0)} / {max(m.waiting, default=0)}"
        lines.append(
            f"{m.at:5.1f} {lanes:>12} {len(busy):>10} {m.outbox:>7}"
            f" {m.backends['active']:>6} {m.backends['idle in transaction']:>5}"
            f" {cores[0]:6.2f} {cores[1]:8.2f} {cores[2]:5.2f} {sum(cores):5.2f}"
        )
    return "\n".join(lines)


def statements_table(r: Result, limit: int = 10) -> str:
    total = sum(s.total_ms for s in r.statements) or 1.0
    lines = [
        f"top statements of {r.mode} by total time ({r.batches} batches, "
        f"{total / 1000:.1f} s in all)",
        f"{'statement':<34}{'calls':>8}{'total ms':>10}{'share':>7}{'ms/call':>9}{'rows/call':>10}",
    ]
    for s in r.statements[:limit]:
        lines.append(
            f"{s.name[:33]:<34}{s.calls:>8}{s.total_ms:>10.0f}{s.total_ms / total:>7.0%}"
            f"{s.mean_ms:>9.3f}{s.rows / s.calls if s.calls else 0:>10.1f}"
        )
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--events", type=int, default=200_000, help="events for the batched drain run"
    )
    parser.add_argument(
        "--baseline-events", type=int, default=20_000, help="events for the per-message drain run"
    )
    parser.add_argument("--batch-max", type=int, default=DEFAULT_BATCH_MAX)
    parser.add_argument(
        "--rate", type=int, default=0, help="also measure latency at this offered rate, events/s"
    )
    parser.add_argument("--seconds", type=int, default=20, help="length of the offered-rate run")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument(
        "--workers", type=int, default=1, help="also drain with this many worker processes at once"
    )
    parser.add_argument(
        "--prefill",
        action="store_true",
        help="also drain on a prefilled database, without and with ANALYZE",
    )
    parser.add_argument(
        "--prefill-scale",
        type=float,
        default=1.0,
        help="scale of the prefill (1.0: 1,000,000 detections, 200,000 sessions, "
        "5,000,000 ledger rows)",
    )
    parser.add_argument(
        "--worker-root",
        type=Path,
        default=ROOT,
        help="the checkout whose worker (and sql/) runs, e.g. a worktree of main",
    )
    parser.add_argument(
        "--event-ids",
        choices=sorted(EVENT_IDS),
        default="v7",
        help="the eventIds the events carry (and the prefilled ledger holds): v7, "
        "time-ordered, as the spoke client sends them (default), or random v4",
    )
    parser.add_argument("--statements", type=int, default=10, help="top statements shown")
    parser.add_argument(
        "--waits",
        action="store_true",
        help="sample pg_stat_activity every 10 ms during each drain: what the worker's "
        "busy backends wait on, by statement",
    )
    parser.add_argument(
        "--timeline",
        action="store_true",
        help="sample every 100 ms of the first drain: each lane's backlog, the outbox, the "
        "worker's backends by state and the cores of each process",
    )
    args = parser.parse_args()
    root = args.worker_root.resolve()

    with servers() as srv:
        await enable_statements(srv)
        events = generate(
            max(args.events, args.baseline_events), event_ids=EVENT_IDS[args.event_ids]
        )
        kinds = {"signal": sum(e.tail.startswith("signal.") for e in events)}
        print(
            f"generated {len(events)} events: {kinds['signal']} signals, "
            f"{len(events) - kinds['signal']} lifecycle, "
            f"{len({e.session for e in events})} sessions, {args.event_ids} eventIds; "
            f"worker from {root}",
            flush=True,
        )

        batched = f"batched({args.batch_max})"
        rows = [
            await drain(
                srv,
                batched,
                args.batch_max,
                events[: args.events],
                worker_root=root,
                waits=args.waits,
                timeline=args.timeline,
            )
        ]
        if not args.skip_baseline:
            rows.append(
                await drain(srv, "per-message", 1, events[: args.baseline_events], worker_root=root)
            )
        if args.workers > 1:
            rows.append(
                await drain(
                    srv,
                    f"{args.workers}x batched",
                    args.batch_max,
                    events[: args.events],
                    args.workers,
                    worker_root=root,
                )
            )
        if args.prefill:
            template, summary = await prefill(srv, root, args.prefill_scale, args.event_ids)
            print(summary, flush=True)
            for analyze in (False, True):
                rows.append(
                    await drain(
                        srv,
                        f"prefilled{', analyzed' if analyze else ''}",
                        args.batch_max,
                        events[: args.events],
                        worker_root=root,
                        template=template,
                        analyze=analyze,
                    )
                )
            admin = await asyncpg.connect(srv.admin_dsn)
            await admin.execute(f'DROP DATABASE IF EXISTS "{template}"')
            await admin.close()
        print()
        print(
            table(rows, "drain: a backlog published first, then applied and relayed (end to end)")
        )
        baseline = next((r for r in rows if r.mode == "per-message"), None)
        if baseline is not None:
            print(f"ratio batched / per-message: {rows[0].rate / baseline.rate:.1f}x")
        print()
        print(cpu_table(rows))
        for r in rows:
            if r.statements:
                print()
                print(statements_table(r, args.statements))
            if r.wait_samples:
                print()
                print(waits_table(r))
            if r.timeline:
                print()
                print(timeline_table(r))

        if args.rate:
            # Latency per inbound event as a subscriber sees it (bench/latency.py).
            from bench.latency import HEADER, steady

            sample = generate(args.rate * args.seconds, seed=2)
            latency_rows = [
                await steady(srv, batched, args.batch_max, sample, args.rate, worker_root=root)
            ]
            if not args.skip_baseline:
                latency_rows.append(
                    await steady(srv, "per-message", 1, sample, args.rate, worker_root=root)
                )
            print()
            print(
                f"latency at a steady {args.rate} events/s, ms: publish to the first outbound "
                "event each event caused"
            )
            print(HEADER)
            for row in latency_rows:
                print(row.row())


if __name__ == "__main__":
    asyncio.run(main())
