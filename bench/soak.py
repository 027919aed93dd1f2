"""Soak: a steady stream for a while, sampled every 10 s; nothing may grow without bound.

    python bench/soak.py --minutes 10 --rate 500

Starts embedded servers (or uses HUB_NATS_URL / HUB_DATABASE_URL), runs one
`hub-worker run`, publishes the bench mix at a steady rate and prints, every
sample: the worker's RSS, publish-to-outbound latency p50/p99 over the
interval, the outbox backlog and the inbound events not yet applied.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import asyncpg
import nats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.throughput import Stage, generate, servers, subject, wait_for_streams  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def soak(admin_dsn: str, nats_url: str, minutes: float, rate: int, sample: float) -> None:
    stage = Stage(admin_dsn, nats_url, "soak", 200)
    await stage.create()
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    published: dict[str, float] = {}
    window: list[float] = []

    async def on_outbound(msg: object) -> None:
        cause = json.loads(msg.data).get("causationId")  # type: ignore[attr-defined]
        sent = published.pop(cause, None) if cause else None
        if sent is not None:
            window.append(time.perf_counter() - sent)

    events = generate(int(rate * minutes * 60) + rate, seed=5)
    try:
        stage.start()
        await wait_for_streams(js, stage.prefix)
        conn = await asyncpg.connect(stage.dsn)
        await nc.subscribe(f"{stage.prefix}.detection.>", cb=on_outbound)
        await nc.subscribe(f"{stage.prefix}.mapping.>", cb=on_outbound)
        print(
            f"{'t s':>6}{'sent':>9}{'RSS MB':>8}{'p50 ms':>8}{'p99 ms':>8}{'outbox':>8}{'behind':>8}",
            flush=True,
        )
        began = time.perf_counter()
        next_sample = began + sample
        for n, event in enumerate(events):
            now = time.perf_counter()
            if now - began > minutes * 60:
                break
            if (pause := began + n / rate - now) > 0:
                await asyncio.sleep(pause)
            published[str(event.body["eventId"])] = time.perf_counter()
            await nc.publish(subject(stage.prefix, event), json.dumps(event.body).encode())
            if time.perf_counter() >= next_sample:
                next_sample += sample
                outbox = await conn.fetchval("SELECT count(*) FROM outbox")
                applied = await conn.fetchval("SELECT count(*) FROM processed_events")
                lat = sorted(window)
                window.clear()
                p50 = statistics.median(lat) * 1000 if lat else float("nan")
                p99 = lat[max(0, int(len(lat) * 0.99) - 1)] * 1000 if lat else float("nan")
                # Events the worker will never answer (heartbeats, coalesced repeats) age out.
                for key, sent in list(published.items()):
                    if time.perf_counter() - sent > 60:
                        del published[key]
                rss = rss_mb(stage.processes[0].pid)
                print(
                    f"{time.perf_counter() - began:>6.0f}{n + 1:>9}{rss:>8.0f}{p50:>8.1f}{p99:>8.1f}"
                    f"{outbox:>8}{n + 1 - applied:>8}",
                    flush=True,
                )
        await conn.close()
        stage.stop()
    finally:
        stage.kill()
        await nc.close()
        await stage.drop()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--rate", type=int, default=500, help="events/s")
    parser.add_argument("--sample", type=float, default=10, help="seconds between samples")
    args = parser.parse_args()
    with servers() as srv:
        await soak(srv.admin_dsn, srv.nats_url, args.minutes, args.rate, args.sample)


if __name__ == "__main__":
    asyncio.run(main())
