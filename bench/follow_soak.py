"""Followers beside a loaded worker: nothing in HUB_OUT may be missed, no follower may die.

    python bench/follow_soak.py --minutes 10 --rate 300

Starts an embedded nats-server (its own, so that it can be restarted on the same
port and store) and PostgreSQL (`bench.throughput.servers`, or HUB_DATABASE_URL),
runs one `hub-worker run` (`bench.throughput.Stage`) and publishes the bench mix
(`bench.throughput.generate`: signals of two kinds and three severities over
~2,000 sessions, lifecycle events) at a steady rate for `--minutes`. Beside it:

- a `hub-worker alerts --json --mappings --durable follow-cli --since all` process;
- a Python follower process (this file with `--python-follower`) using
  `worker.client.subscribe(..., durable="follow-py", include_mappings=True,
  since="all")` and `Alerts.handle`, whose handler raises on every 50th first
  delivery (so the alert is handed back and delivered again);
- every `--inject-every` seconds, a status-only message (`Status: 408`, empty
  body) twice, a second apart, to each follower's pull inbox (the reply subject
  of its pull requests, seen on `$JS.API.CONSUMER.MSG.NEXT.<stream>.<durable>`);
- once, half-way, a restart of the nats-server (same port, same store).

At the end (the worker drained, the outbox empty) every detection and mapping
event in HUB_OUT, read by sequence, must have been received by each follower
(by outbound eventId; duplicates allowed and counted), and both followers must
still be running. One summary line; exit 1 when either condition fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import asyncpg
import nats
import nats.errors
import nats.js.errors

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent
sys.path.insert(0, str(ROOT))

from bench.throughput import (  # noqa: E402
    Stage,
    generate,
    outstanding,
    proc_stats,
    servers,
    subject,
    wait_for_streams,
)
from worker.embedded import EmbeddedNats  # noqa: E402
from worker.subjects import out_stream  # noqa: E402

CLI_DURABLE = "follow-cli"
PY_DURABLE = "follow-py"
RAISE_EVERY = 50


class Injected(Exception):
    """The Python follower's handler failing on purpose."""


async def python_follower(nats_url: str, prefix: str, durable: str, out: Path) -> None:
    """The Python follower: `ok <eventId>` per alert handled, `raise <eventId>` per
    alert its handler refused (delivered again later)."""
    from worker.client import AlertEvent, subscribe

    first_seen: set[str] = set()
    with out.open("a", buffering=1) as log:

        def handle(event: AlertEvent) -> None:
            event_id = str(event.event_id)
            if event_id not in first_seen:
                first_seen.add(event_id)
                if len(first_seen) % RAISE_EVERY == 0:
                    log.write(f"raise {event_id}\n")
                    raise Injected(event_id)
            log.write(f"ok {event_id}\n")

        nc = await nats.connect(nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        async with subscribe(
            nc, prefix, durable=durable, include_mappings=True, since="all"
        ) as alerts:
            while True:
                with contextlib.suppress(Injected):
                    await alerts.handle(handle)


class Tail:
    """New complete lines of a file that another process appends to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.rest = b""

    def lines(self) -> list[str]:
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        data = self.rest + data
        *complete, self.rest = data.split(b"\n")
        return [line.decode() for line in complete if line.strip()]


class Follower:
    def __init__(self, name: str, durable: str, scratch: Path) -> None:
        self.name = name
        self.durable = durable
        self.out = scratch / f"{name}.out"
        self.err = scratch / f"{name}.err"
        self.out.touch()
        self.tail = Tail(self.out)
        self.process: subprocess.Popen[bytes] | None = None
        self.received: Counter[str] = Counter()
        self.raised = 0
        self.inbox: str | None = None
        self.injected = 0
        self.bad_lines = 0

    def start(self, argv: list[str], env: dict[str, str]) -> None:
        with self.out.open("ab") as out, self.err.open("ab") as err:
            self.process = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=err)

    def read(self) -> None:
        for line in self.tail.lines():
            if self.name == "cli":
                try:
                    self.received[str(json.loads(line)["eventId"])] += 1
                except (ValueError, KeyError):
                    self.bad_lines += 1
            elif line.startswith("ok "):
                self.received[line[3:]] += 1
            elif line.startswith("raise "):
                self.raised += 1

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def duplicates(self) -> int:
        return sum(n - 1 for n in self.received.values() if n > 1)


async def outbound_in_sequence(js: object, stream: str, prefix: str) -> dict[str, str]:
    """eventId -> subject of every detection and mapping event in the stream, read by
    sequence (no consumer involved), as tests/support's `Hub.outbound_in_sequence`."""
    info = await js.stream_info(stream)  # type: ignore[attr-defined]
    found: dict[str, str] = {}
    if not info.state.messages:
        return found
    wanted = (f"{prefix}.detection.", f"{prefix}.mapping.")
    seqs = range(info.state.first_seq, info.state.last_seq + 1)
    for start in range(0, len(seqs), 200):

        async def get(seq: int) -> object | None:
            try:
                return await js.get_msg(stream, seq)  # type: ignore[attr-defined]
            except nats.js.errors.NotFoundError:
                return None

        for msg in await asyncio.gather(*(get(s) for s in seqs[start : start + 200])):
            if msg is not None and msg.subject.startswith(wanted):  # type: ignore[attr-defined]
                found[str(json.loads(msg.data)["eventId"])] = msg.subject  # type: ignore[attr-defined]
    return found


async def inject_408(nc: object, followers: list[Follower]) -> None:
    """A stale `408` (an earlier pull's expiry arriving late), twice, a second apart."""
    for _ in range(2):
        for f in followers:
            if f.inbox is None:
                continue
            with contextlib.suppress(nats.errors.Error):
                await nc.publish(  # type: ignore[attr-defined]
                    f.inbox, b"", headers={"Status": "408", "Description": "Timeout"}
                )
                f.injected += 1
        with contextlib.suppress(nats.errors.Error):
            await nc.flush(timeout=2)  # type: ignore[attr-defined]
        await asyncio.sleep(1)


async def follow_soak(args: argparse.Namespace, server: EmbeddedNats, admin_dsn: str) -> int:
    nats_url = server.url
    scratch = Path(tempfile.mkdtemp(prefix="hub-follow-soak-"))
    stage = Stage(admin_dsn, nats_url, "follow", 200)
    await stage.create()
    stream = out_stream(stage.prefix)

    async def quiet(err: Exception) -> None:
        pass  # the restart's refused reconnects: expected

    nc = await nats.connect(
        nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.2, error_cb=quiet
    )
    js = nc.jetstream(timeout=10)
    cli = Follower("cli", CLI_DURABLE, scratch)
    py = Follower("python", PY_DURABLE, scratch)
    followers = [cli, py]
    restarts = 0
    published = 0
    minutes = args.minutes
    try:
        for f in followers:

            async def seen(msg: object, f: Follower = f) -> None:
                f.inbox = msg.reply  # type: ignore[attr-defined]

            await nc.subscribe(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{f.durable}", cb=seen)
        stage.start()
        await wait_for_streams(js, stage.prefix)
        env = {
            **os.environ,
            "HUB_NATS_URL": nats_url,
            "HUB_SUBJECT_PREFIX": stage.prefix,
            "PYTHONPATH": str(ROOT),
        }
        cli.start(
            [
                *(sys.executable, "-m", "worker", "alerts", "--json", "--mappings"),
                *("--durable", CLI_DURABLE, "--since", "all"),
            ],
            env,
        )
        py.start(
            [
                *(sys.executable, str(SCRIPT), "--python-follower"),
                *("--nats-url", nats_url, "--prefix", stage.prefix),
                *("--durable", PY_DURABLE, "--out", str(py.out)),
            ],
            {**env, "PYTHONUNBUFFERED": "1"},
        )
        await asyncio.sleep(1)
        events = generate(int(args.rate * minutes * 60) + args.rate, seed=7)
        print(
            f"prefix {stage.prefix}, worker log {stage.log}, follower files in {scratch}",
            flush=True,
        )
        print(f"{'t s':>6}{'sent':>9}{'cli':>9}{'python':>9}{'408s':>6}  alive", flush=True)
        began = time.perf_counter()
        duration = minutes * 60
        next_inject = began + args.inject_every
        next_sample = began + 30
        restart_at = began + duration / 2
        injecting: set[asyncio.Task[None]] = set()
        for n, event in enumerate(events):
            now = time.perf_counter()
            if now - began > duration:
                break
            if (pause := began + n / args.rate - now) > 0:
                await asyncio.sleep(pause)
            data = json.dumps(event.body).encode()
            headers = {"Nats-Msg-Id": str(event.body["eventId"])}
            while True:  # the same id again after a failed ack: the stream drops a copy
                try:
                    await js.publish(subject(stage.prefix, event), data, headers=headers)
                    break
                except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
                    await asyncio.sleep(0.2)
            published += 1
            now = time.perf_counter()
            if now >= next_inject:
                next_inject += args.inject_every
                task = asyncio.create_task(inject_408(nc, followers))
                injecting.add(task)
                task.add_done_callback(injecting.discard)
            if restarts == 0 and now >= restart_at:
                restarts += 1
                print(f"{now - began:>6.0f}  restarting nats-server", flush=True)
                server.stop()
                await asyncio.sleep(2)
                server.start()  # same port, same store
            if now >= next_sample:
                next_sample += 30
                for f in followers:
                    f.read()
                print(
                    f"{now - began:>6.0f}{published:>9}{len(cli.received):>9}"
                    f"{len(py.received):>9}{cli.injected + py.injected:>6}  "
                    f"cli={'yes' if cli.alive else 'NO'} python={'yes' if py.alive else 'NO'}",
                    flush=True,
                )
        elapsed = time.perf_counter() - began
        await asyncio.gather(*injecting)

        # The worker drained and the relay published everything, then the followers caught up.
        conn = await asyncpg.connect(stage.dsn)
        deadline = time.perf_counter() + 300
        while time.perf_counter() < deadline:
            left = await outstanding(js, f"{stage.prefix.upper()}_EVENTS")
            if left == 0 and not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM outbox)"):
                break
            await asyncio.sleep(0.5)
        await conn.close()
        expected = await outbound_in_sequence(js, stream, stage.prefix)
        deadline = time.perf_counter() + args.settle
        while time.perf_counter() < deadline:
            for f in followers:
                f.read()
            if all(expected.keys() <= f.received.keys() or not f.alive for f in followers):
                break
            await asyncio.sleep(1)
        await asyncio.sleep(2)  # anything still arriving counts as a duplicate
        for f in followers:
            f.read()
        alive = {f.name: f.alive for f in followers}
        rss = {f.name: proc_stats(f.process.pid)[0] if f.alive else 0.0 for f in followers}  # type: ignore[union-attr]
        for f in followers:
            if f.alive:
                f.process.send_signal(signal.SIGINT)  # type: ignore[union-attr]
        for f in followers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                f.process.wait(timeout=15)  # type: ignore[union-attr]
        stage.stop()

        missing = {f.name: [e for e in expected if e not in f.received] for f in followers}
        print(
            f"follow-soak: {elapsed / 60:.1f} min, {published} events published at "
            f"{args.rate}/s, {len(expected)} outbound detection/mapping events; "
            + "; ".join(
                f"{f.name} received {len(expected) - len(missing[f.name])}/{len(expected)} "
                f"(duplicates {f.duplicates()}"
                + (f", handler raised {f.raised}" if f.name == "python" else "")
                + f", 408s injected {f.injected}, max RSS {rss[f.name]:.0f} MB, "
                f"{'alive' if alive[f.name] else 'DIED'})"
                for f in followers
            )
            + f"; nats-server restarts {restarts}",
            flush=True,
        )
        failed = False
        for f in followers:
            if missing[f.name]:
                failed = True
                print(f"{f.name} missed {len(missing[f.name])}, e.g.:")
                for event_id in missing[f.name][:5]:
                    print(f"  {event_id} {expected[event_id]}")
            if not alive[f.name]:
                failed = True
                print(f"{f.name} died (exit {f.process.returncode}); its stderr ends:")  # type: ignore[union-attr]
                print("\n".join(f.err.read_text(errors="replace").splitlines()[-30:]))
            if f.bad_lines:
                print(f"{f.name}: {f.bad_lines} lines that are not an event")
        if not failed:
            shutil.rmtree(scratch, ignore_errors=True)
        return 1 if failed else 0
    finally:
        for f in followers:
            if f.alive:
                f.process.kill()  # type: ignore[union-attr]
        stage.kill()
        await nc.close()
        await stage.drop()


async def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--rate", type=int, default=300, help="events/s")
    parser.add_argument(
        "--inject-every", type=float, default=30, help="seconds between 408 injections"
    )
    parser.add_argument(
        "--settle", type=float, default=120, help="seconds the followers get to catch up"
    )
    parser.add_argument("--python-follower", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--nats-url", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--durable", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.python_follower:
        await python_follower(args.nats_url, args.prefix, args.durable, args.out)
        return 0
    scratch = Path(tempfile.mkdtemp(prefix="hub-follow-nats-"))
    server = EmbeddedNats(scratch / "nats")
    try:
        server.start()
        # `servers()` then starts only PostgreSQL (or takes HUB_DATABASE_URL).
        os.environ["HUB_NATS_URL"] = server.url
        with servers() as srv:
            return await follow_soak(args, server, srv.admin_dsn)
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
