"""Latency as a subscriber sees it: publish of an inbound event to the arrival of the
first outbound event whose `causationId` is that event.

    python bench/latency.py --rate 1000 --seconds 20            # one worker, defaults
    python bench/latency.py --rate 300 --rate 1000 --runs 3

Starts embedded servers (or uses HUB_NATS_URL / HUB_DATABASE_URL), runs one
`hub-worker run` with its defaults (8 partitions, HUB_BATCH_MAX 200), and publishes
the bench mix at a steady rate with plain NATS publishes. A separate subscriber
process (its own event loop, so arrivals are not timed late behind the publisher)
listens on `P.detection.>` and `P.mapping.>` and notes when each outbound event
arrives. Per inbound event that caused any outbound event, its latency is the
first arrival minus its publish (both wall-clock, one machine); events that cause
none (heartbeats, `repeated` events the relay coalesced) are not counted, and
neither are the first `--warmup` seconds (lanes being claimed, caches filling).

Besides p50/p90/p99/max it splits each latency at the outbound event's `occurredAt`,
which is the batch transaction's `now()` (its start): `in` is publish to the start
of the transaction that applied the event (JetStream, the fetch, waiting for the
lane), `out` is that start to the arrival (the transaction, its commit, the relay's
wake-up, read, publish and the delivery). `batch` is the events published per batch
transaction the worker opened meanwhile (from `pg_stat_statements`): at a steady
rate the cost of a transaction is mostly fixed, so CPU per event follows it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import nats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.throughput import (  # noqa: E402
    Event,
    Servers,
    Stage,
    Statement,
    enable_statements,
    generate,
    machine_seconds,
    proc_stats,
    reset_statements,
    servers,
    subject,
    top_statements,
    wait_for_streams,
)
from worker.config import DEFAULT_BATCH_MAX  # noqa: E402


@dataclass
class Latency:
    mode: str
    rate: int
    offered: int  # events published and counted (after the warm-up)
    caused: int  # of them, those that caused an outbound event seen by the subscriber
    total_ms: list[float] = field(default_factory=list)
    in_ms: list[float] = field(default_factory=list)
    out_ms: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    cpu_seconds: float = 0.0
    # CPU ms per published event while publishing, per process.
    cpu_ms: dict[str, float] = field(default_factory=dict)
    # Cores busy meanwhile with anything but the worker and the servers (other
    # work on the machine, this benchmark's publisher and subscriber included).
    others: float = 0.0
    # Cores the hypervisor gave to other guests meanwhile (/proc/stat's steal).
    steal: float = 0.0
    statements: list[Statement] = field(default_factory=list)
    seconds: float = 0.0  # of publishing
    offered_all: int = 0  # events published in the measured window, warm-up included

    @property
    def batch(self) -> float:
        """Events per batch transaction (`batch_start` opens each), NaN if not counted."""
        opened = sum(st.calls for st in self.statements if st.name == "batch_start")
        return self.offered_all / opened if opened else float("nan")

    @staticmethod
    def quantile(values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]

    def row(self) -> str:
        t, i, o = self.total_ms, self.in_ms, self.out_ms
        q = self.quantile
        return (
            f"{self.mode:<14}{self.rate:>6}{self.caused:>8}"
            f"{statistics.median(t) if t else float('nan'):>8.1f}{q(t, 0.9):>8.1f}"
            f"{q(t, 0.99):>8.1f}{max(t, default=float('nan')):>8.1f}"
            f"{q(i, 0.5):>8.1f}{q(i, 0.99):>8.1f}{q(o, 0.5):>8.1f}{q(o, 0.99):>8.1f}"
            f"{self.peak_rss_mb:>7.0f}"
            + "".join(
                f"{self.cpu_ms.get(p, float('nan')):>8.3f}" for p in ("worker", "postgres", "nats")
            )
            + f"{self.others:>8.2f}{self.steal:>7.2f}{self.batch:>7.1f}"
        )


HEADER = (
    f"{'mode':<14}{'rate':>6}{'events':>8}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}"
    f"{'in p50':>8}{'in p99':>8}{'out p50':>8}{'out p99':>8}{'RSS':>7}"
    f"{'worker':>8}{'postgres':>8}{'nats':>8}{'others':>8}{'steal':>7}{'batch':>7}"
)


def subscriber_main(nats_url: str, prefix: str, out: str) -> None:
    """The subscriber process: first arrival per causationId, written to `out` on SIGTERM."""

    async def run() -> None:
        nc = await nats.connect(nats_url)
        first: dict[str, tuple[float, str]] = {}

        async def on_outbound(msg: object) -> None:
            arrived = time.time()
            body = json.loads(msg.data)  # type: ignore[attr-defined]
            cause = body.get("causationId")
            if cause and cause not in first:
                first[cause] = (arrived, body["occurredAt"])

        await nc.subscribe(f"{prefix}.detection.>", cb=on_outbound)
        await nc.subscribe(f"{prefix}.mapping.>", cb=on_outbound)
        await nc.flush()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print("ready", flush=True)
        await stop.wait()
        await nc.close()
        Path(out).write_text(json.dumps(first))  # noqa: ASYNC240 (the run is over)

    asyncio.run(run())


async def steady(
    srv: Servers,
    mode: str,
    batch_max: int,
    events: list[Event],
    rate: int,
    warmup: float = 2.0,
    env: dict[str, str] | None = None,
    worker_root: Path = ROOT,
    profile: str | None = None,
) -> Latency:
    """One worker, `events` published at `rate` per second; latency per inbound event."""
    stage = Stage(srv.admin_dsn, srv.nats_url, mode, batch_max, worker_root=worker_root)
    if env:
        base = stage.env

        def with_extra() -> dict[str, str]:
            return {**base(), **env}

        stage.env = with_extra  # type: ignore[method-assign]
    await stage.create()
    nc = await nats.connect(srv.nats_url)
    js = nc.jetstream(timeout=30)
    out = tempfile.mkstemp(prefix="bench-arrivals-", suffix=".json")[1]
    listener = subprocess.Popen(  # noqa: ASYNC220 (it returns at once)
        [sys.executable, __file__, "--subscriber", srv.nats_url, stage.prefix, out],
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    published: dict[str, float] = {}
    try:
        assert listener.stdout is not None
        await asyncio.to_thread(listener.stdout.readline)
        stage.start()
        await wait_for_streams(js, stage.prefix)
        await asyncio.sleep(1)  # the lanes claimed
        if profile:
            spy = subprocess.Popen(  # noqa: ASYNC220 (it returns at once)
                [
                    str(Path(sys.executable).parent / "py-spy"),
                    "record",
                    "--pid",
                    str(stage.processes[0].pid),
                    "--rate",
                    "250",
                    "--format",
                    "raw",
                    "--output",
                    profile,
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        await reset_statements(srv)
        cpu_before = {"worker": stage.worker_cpu_seconds(), **srv.cpu()}
        busy_before, stolen_before = machine_seconds()
        began = time.perf_counter()
        counted_from = began + warmup
        for n, event in enumerate(events):
            due = began + n / rate
            if (pause := due - time.perf_counter()) > 0:
                await asyncio.sleep(pause)
            if time.perf_counter() >= counted_from:
                published[str(event.body["eventId"])] = time.time()
            await nc.publish(
                subject(stage.prefix, event),
                json.dumps(event.body).encode(),
                headers={"Nats-Msg-Id": str(event.body["eventId"])},
            )
        await nc.flush()
        cpu_after = {"worker": stage.worker_cpu_seconds(), **srv.cpu()}
        busy, stolen = machine_seconds()
        busy, stolen = busy - busy_before, stolen - stolen_before
        publishing = time.perf_counter() - began
        statements = (
            await top_statements(srv, stage.database, worker_root, 30) if srv.statements else []
        )
        if profile:
            spy.send_signal(signal.SIGINT)
            await asyncio.to_thread(spy.wait, 60)
        await asyncio.sleep(3)
        rss, cpu = proc_stats(stage.processes[0].pid)
        stage.stop()
        listener.send_signal(signal.SIGTERM)
        await asyncio.to_thread(listener.wait, 30)
        arrivals: dict[str, tuple[float, str]] = json.loads(
            Path(out).read_text()  # noqa: ASYNC240 (the run is over)
        )
        result = Latency(mode, rate, len(published), 0, peak_rss_mb=rss, cpu_seconds=cpu)
        for name, after in cpu_after.items():
            label = "nats" if name == "nats-server" else name
            result.cpu_ms[label] = (after - cpu_before[name]) * 1000 / len(events)
        ours = sum(after - cpu_before[name] for name, after in cpu_after.items())
        result.others = (busy - ours) / publishing
        result.steal = stolen / publishing
        result.statements, result.seconds = statements, publishing
        result.offered_all = len(events)
        for event_id, sent in published.items():
            seen = arrivals.get(event_id)
            if seen is None:
                continue
            arrived, occurred = seen
            started = datetime.fromisoformat(occurred).timestamp()
            result.caused += 1
            result.total_ms.append((arrived - sent) * 1000)
            result.in_ms.append((started - sent) * 1000)
            result.out_ms.append((arrived - started) * 1000)
        return result
    finally:
        if listener.poll() is None:
            listener.kill()
        Path(out).unlink(missing_ok=True)  # noqa: ASYNC240 (the run is over)
        stage.kill()
        await nc.close()
        await stage.drop()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=int, action="append", help="events/s (repeatable)")
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--runs", type=int, default=1, help="runs per rate")
    parser.add_argument("--batch-max", type=int, default=DEFAULT_BATCH_MAX)
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds not counted")
    parser.add_argument(
        "--env", action="append", default=[], help="NAME=VALUE for the worker (repeatable)"
    )
    parser.add_argument("--worker-root", type=Path, default=ROOT)
    parser.add_argument("--statements", type=int, default=0, help="top statements shown")
    parser.add_argument("--profile", help="py-spy the worker while publishing, raw, to this file")
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.env)
    rows = []
    with servers() as srv:
        await enable_statements(srv)
        for rate in args.rate or [300, 1000]:
            sample = generate(rate * args.seconds, seed=2)
            for _ in range(args.runs):
                result = await steady(
                    srv,
                    f"batched({args.batch_max})",
                    args.batch_max,
                    sample,
                    rate,
                    args.warmup,
                    extra,
                    args.worker_root.resolve(),
                    args.profile,
                )
                print(result.row(), flush=True)
                if args.statements:
                    for st in result.statements[: args.statements]:
                        print(
                            f"    {st.name[:40]:<42}{st.calls / result.seconds:>8.0f}/s"
                            f"{st.mean_ms:>8.3f} ms{st.rows / max(1, st.calls):>8.1f} rows"
                        )
                rows.append(result)
    print()
    print("latency, ms: publish to the first outbound event it caused (one worker)")
    print(HEADER)
    for row in rows:
        print(row.row())


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--subscriber":
        subscriber_main(*sys.argv[2:])
    else:
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        asyncio.run(main())
