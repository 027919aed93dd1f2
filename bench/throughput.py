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
  measured from publish to receipt of the outbound event the event caused.

Peak RSS is the worker's VmHWM, CPU seconds its user+system time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit
from uuid import uuid4

import asyncpg
import nats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from worker.embedded import EmbeddedNats, EmbeddedPostgres  # noqa: E402

SEVERITIES = ("low", "low", "low", "medium", "medium", "high")
KINDS = ("model_degradation", "high_error_count")


@dataclass
class Event:
    session: str
    tail: str  # what follows "P.spoke.<spoke>.session.<session>."
    body: dict[str, object]


def generate(count: int, seed: int = 1) -> list[Event]:
    """Per 100 events: ~70 signals repeating over ~1,000 active keys, ~10 signals
    opening new keys, ~20 lifecycle events over ~2,000 sessions, each session
    going spawned -> started -> heartbeats -> completed/failed -> archived in order."""
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
                events.append(Event(session, "spawned", body(session, task=f"task {session}")))
            elif step == 1:
                events.append(Event(session, "started", body(session)))
            elif step < 6:
                events.append(Event(session, "heartbeat", body(session)))
            elif step == 6:
                end = rng.choice(["completed", "completed", "failed"])
                events.append(Event(session, end, body(session, reason="done")))
            else:
                events.append(Event(session, "archived", body(session)))
                alive.remove(session)
                hot = [k for k in hot if k[0] != session]
        elif roll < 0.3 or len(hot) < 1000:
            key = (rng.choice(alive), rng.choice(KINDS), uuid4().hex[:8])
            hot.append(key)
            if len(hot) > 1000:
                hot.pop(0)
            events.append(signal_event(key, rng))
        else:
            events.append(signal_event(rng.choice(hot), rng))
    return events


def body(session: str, **extra: object) -> dict[str, object]:
    return {
        "eventId": str(uuid4()),
        "occurredAt": datetime.now(UTC).isoformat(),
        "spokeId": f"spoke-{int(session.rsplit('-', 1)[1]) % 20}",
        "sessionId": session,
        **extra,
    }


def signal_event(key: tuple[str, str, str], rng: random.Random) -> Event:
    session, kind, fingerprint = key
    payload = body(
        session,
        severity=rng.choice(SEVERITIES),
        details={"n": rng.randint(1, 99)},
        fingerprint=fingerprint,
    )
    return Event(session, f"signal.{kind}", payload)


def subject(prefix: str, event: Event) -> str:
    return f"{prefix}.spoke.{event.body['spokeId']}.session.{event.session}.{event.tail}"


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

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


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
        self, admin_dsn: str, nats_url: str, mode: str, batch_max: int, workers: int = 1
    ) -> None:
        self.mode = mode
        self.prefix = f"bench{uuid4().hex[:6]}"
        self.database = f"bench_{uuid4().hex[:8]}"
        self.admin_dsn = admin_dsn
        self.dsn = urlunsplit(urlsplit(admin_dsn)._replace(path=f"/{self.database}"))
        self.nats_url = nats_url
        self.batch_max = batch_max
        self.workers = workers
        self.processes: list[subprocess.Popen[bytes]] = []
        self.log = Path(tempfile.mkstemp(prefix=f"bench-{mode}-", suffix=".log")[1])

    async def create(self) -> None:
        admin = await asyncpg.connect(self.admin_dsn)
        await admin.execute(f'CREATE DATABASE "{self.database}"')
        await admin.close()

    def start(self) -> None:
        env = {
            **os.environ,
            "HUB_NATS_URL": self.nats_url,
            "HUB_DATABASE_URL": self.dsn,
            "HUB_SUBJECT_PREFIX": self.prefix,
            "HUB_BATCH_MAX": str(self.batch_max),
            "HUB_HTTP_ADDR": os.environ.get("BENCH_HTTP_ADDR", ""),
            "HUB_LOG_FORMAT": "json",
            "PYTHONPATH": str(ROOT),
        }
        with self.log.open("ab") as out:
            self.processes = [
                subprocess.Popen(
                    [sys.executable, "-m", "worker", "run"],
                    env=env,
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


@contextmanager
def servers() -> Iterator[tuple[str, str]]:
    """(NATS URL, admin DSN): HUB_NATS_URL / HUB_DATABASE_URL, or embedded servers for
    what is not given (BENCH_PG_OPTIONS: extra PostgreSQL settings as JSON)."""
    scratch = Path(tempfile.mkdtemp(prefix="hub-bench-"))
    started: list[EmbeddedNats | EmbeddedPostgres] = []
    try:
        nats_url = os.environ.get("HUB_NATS_URL")
        if not nats_url:
            embedded_nats = EmbeddedNats(scratch / "nats")
            nats_url = embedded_nats.start()
            started.append(embedded_nats)
        admin_dsn = os.environ.get("HUB_DATABASE_URL")
        if not admin_dsn:
            extra = json.loads(os.environ.get("BENCH_PG_OPTIONS", "{}"))
            embedded_pg = EmbeddedPostgres(
                scratch / "postgres", options={"max_connections": "200", **extra}
            )
            admin_dsn = embedded_pg.start()
            started.append(embedded_pg)
        yield nats_url, admin_dsn
    finally:
        for server in reversed(started):
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


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


async def drain(
    admin_dsn: str, nats_url: str, mode: str, batch_max: int, events: list[Event], workers: int = 1
) -> Result:
    stage = Stage(admin_dsn, nats_url, mode, batch_max, workers)
    await stage.create()
    nc = await nats.connect(nats_url)
    js = nc.jetstream(timeout=30)
    try:
        # Create the streams with a first short run, then publish the backlog.
        stage.start()
        await wait_for_streams(js, stage.prefix)
        stage.stop()
        await publish(js, stage.prefix, events)
        conn = await asyncpg.connect(stage.dsn)
        stage.start()
        started = None
        while True:
            applied = await conn.fetchval("SELECT count(*) FROM processed_events")
            if started is None and applied:
                started = time.perf_counter()
            if applied >= len(events) and await conn.fetchval("SELECT count(*) FROM outbox") == 0:
                break
            await asyncio.sleep(0.02)
        assert started is not None
        elapsed = time.perf_counter() - started
        rss, cpu = stage.stop()
        await conn.close()
        return Result(mode, len(events), elapsed, peak_rss_mb=rss, cpu_seconds=cpu)
    finally:
        stage.kill()
        await nc.close()
        await stage.drop()


async def offered_rate(
    admin_dsn: str, nats_url: str, mode: str, batch_max: int, events: list[Event], rate: int
) -> Result:
    stage = Stage(admin_dsn, nats_url, mode, batch_max)
    await stage.create()
    nc = await nats.connect(nats_url)
    js = nc.jetstream(timeout=30)
    published: dict[str, float] = {}
    latencies: list[float] = []

    async def on_outbound(msg: object) -> None:
        cause = json.loads(msg.data).get("causationId")  # type: ignore[attr-defined]
        sent = published.get(cause) if cause else None
        if sent is not None:
            latencies.append(time.perf_counter() - sent)

    try:
        stage.start()
        await wait_for_streams(js, stage.prefix)
        await nc.subscribe(f"{stage.prefix}.detection.>", cb=on_outbound)
        await nc.subscribe(f"{stage.prefix}.mapping.>", cb=on_outbound)
        await asyncio.sleep(1)
        began = time.perf_counter()
        for n, event in enumerate(events):
            due = began + n / rate
            if (pause := due - time.perf_counter()) > 0:
                await asyncio.sleep(pause)
            published[str(event.body["eventId"])] = time.perf_counter()
            await nc.publish(
                subject(stage.prefix, event),
                json.dumps(event.body).encode(),
                headers={"Nats-Msg-Id": str(event.body["eventId"])},
            )
        await nc.flush()
        await asyncio.sleep(3)
        elapsed = time.perf_counter() - began
        rss, cpu = stage.stop()
        latencies.sort()
        p50 = statistics.median(latencies) * 1000 if latencies else None
        p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000 if latencies else None
        return Result(mode, len(events), elapsed, p50, p99, rss, cpu)
    finally:
        stage.kill()
        await nc.close()
        await stage.drop()


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
    parser.add_argument("--batch-max", type=int, default=200)
    parser.add_argument(
        "--rate", type=int, default=0, help="also measure latency at this offered rate, events/s"
    )
    parser.add_argument("--seconds", type=int, default=20, help="length of the offered-rate run")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument(
        "--workers", type=int, default=1, help="also drain with this many worker processes at once"
    )
    args = parser.parse_args()

    with servers() as (nats_url, admin_dsn):
        events = generate(max(args.events, args.baseline_events))
        kinds = {"signal": sum(e.tail.startswith("signal.") for e in events)}
        print(
            f"generated {len(events)} events: {kinds['signal']} signals, "
            f"{len(events) - kinds['signal']} lifecycle, "
            f"{len({e.session for e in events})} sessions",
            flush=True,
        )

        rows = [
            await drain(
                admin_dsn,
                nats_url,
                f"batched({args.batch_max})",
                args.batch_max,
                events[: args.events],
            )
        ]
        if not args.skip_baseline:
            rows.append(
                await drain(admin_dsn, nats_url, "per-message", 1, events[: args.baseline_events])
            )
        if args.workers > 1:
            rows.append(
                await drain(
                    admin_dsn,
                    nats_url,
                    f"{args.workers}x batched",
                    args.batch_max,
                    events[: args.events],
                    args.workers,
                )
            )
        print()
        print(
            table(rows, "drain: a backlog published first, then applied and relayed (end to end)")
        )
        baseline = next((r for r in rows if r.mode == "per-message"), None)
        if baseline is not None:
            print(f"ratio batched / per-message: {rows[0].rate / baseline.rate:.1f}x")

        if args.rate:
            count = args.rate * args.seconds
            sample = generate(count, seed=2)
            latency_rows = [
                await offered_rate(
                    admin_dsn,
                    nats_url,
                    f"batched({args.batch_max})",
                    args.batch_max,
                    sample,
                    args.rate,
                )
            ]
            if not args.skip_baseline:
                latency_rows.append(
                    await offered_rate(admin_dsn, nats_url, "per-message", 1, sample, args.rate)
                )
            print()
            print(
                table(
                    latency_rows,
                    f"latency at an offered {args.rate} events/s, publish to outbound event",
                )
            )


if __name__ == "__main__":
    asyncio.run(main())
