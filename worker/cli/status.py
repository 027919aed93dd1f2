"""`hub-worker status`: what a running hub knows, on one screen or as JSON.

Read straight from the servers, so it answers however many workers run (or none):

- lanes and their consumers (JetStream consumer info): pending and unacked messages,
  and the age of the oldest message not yet applied (the first stored after the ack
  floor, as the stall sweep measures it);
- who owns each lane and who leads the relay, the sweep and the janitor: the holders
  of the hub's advisory locks (pg_locks), named by the `name@host:pid` application
  name each worker connection carries (`worker.db.tagged`);
- the outbox, dead letters of the last hour by reason, active detections by severity.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo

from worker import db
from worker.cli.arguments import parse_positive_seconds
from worker.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    CommandFailed,
    Endpoints,
    command_parser,
    database,
    describe,
    error,
    nats_connection,
    stop_on_signals,
    table,
)
from worker.config import Settings
from worker.domain import SEVERITIES
from worker.locks import (
    MAINTENANCE_LEADER,
    MEMBER_KEY_BASE,
    RELAY_LEADER,
    SWEEP_LEADER,
    namespace,
)
from worker.partitions import Lane, lanes
from worker.subjects import partitions_of

# Dead letters are counted over this window, seconds.
DEAD_LETTER_WINDOW_SECONDS = 3600
# The leader duties, by the name status shows, and their lock keys.
LEADER_KEYS = {"relay": RELAY_LEADER, "sweep": SWEEP_LEADER, "janitor": MAINTENANCE_LEADER}

Table = Callable[[Sequence[str], Sequence[Sequence[str]]], str]


@dataclass(frozen=True)
class LaneStatus:
    lane: str
    owner: str | None
    # None when the lane's consumer does not exist.
    pending: int | None
    unacked: int | None
    oldest_unapplied_seconds: float | None


@dataclass(frozen=True)
class HubStatus:
    at: datetime
    prefix: str
    events_stream: str
    stream_exists: bool
    workers: list[str]
    lanes: list[LaneStatus]
    outbox_rows: int
    outbox_oldest_seconds: float | None
    leaders: dict[str, str | None]
    dead_letters: dict[str, int]
    detections: dict[str, int] = field(default_factory=dict)

    @property
    def backlog(self) -> int:
        return sum((lane.pending or 0) + (lane.unacked or 0) for lane in self.lanes)


def holder_name(holder: db.LockHolder) -> str:
    """`host:pid` of the worker holding a lock, or where the session comes from."""
    tagged = db.process_of(holder.application_name)
    if tagged is not None:
        return tagged
    where = holder.client_addr or "local"
    return f"{holder.application_name or '?'} from {where} (backend {holder.backend_pid})"


async def gather(conn: db.Connection, js: JetStreamContext, settings: Settings) -> HubStatus:
    """One look at the hub: NATS first, then PostgreSQL, each read once."""
    stream = settings.events_stream
    now = datetime.now(UTC)
    stream_exists = True
    infos: dict[str, ConsumerInfo] = {}
    all_lanes: list[Lane] = []
    try:
        stream_info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        stream_exists = False
    else:
        transform = stream_info.config.subject_transform
        all_lanes = lanes(
            settings.subject_prefix, partitions_of(transform.dest if transform else None)
        )
        infos = {
            info.name: info for info in await js.consumers_info(stream) if info.name is not None
        }
    oldest: dict[str, float | None] = {}
    for lane in all_lanes:
        info = infos.get(lane.durable)
        oldest[lane.durable] = (
            await _oldest_unapplied_seconds(js, stream, lane, info, now) if info else None
        )

    lock_namespace = namespace(settings.subject_prefix)
    holders = {h.key: holder_name(h) for h in await db.lock_holders(conn, lock_namespace)}
    outbox = await db.outbox_backlog(conn)
    rows, oldest_outbox = outbox.rows, outbox.oldest
    dead_letters = await db.dead_letters_by_reason(conn, DEAD_LETTER_WINDOW_SECONDS)
    detections = await db.active_detections_by_severity(conn)

    lane_statuses = [
        LaneStatus(
            lane=lane.durable,
            owner=holders.get(lane.key),
            pending=None if lane.durable not in infos else infos[lane.durable].num_pending or 0,
            unacked=None if lane.durable not in infos else infos[lane.durable].num_ack_pending or 0,
            oldest_unapplied_seconds=oldest[lane.durable],
        )
        for lane in all_lanes
    ]
    members = {name for key, name in holders.items() if key >= MEMBER_KEY_BASE}
    owners = {s.owner for s in lane_statuses if s.owner is not None}
    leaders = {role: holders.get(key) for role, key in LEADER_KEYS.items()}
    workers = members | owners | {name for name in leaders.values() if name is not None}
    return HubStatus(
        at=now,
        prefix=settings.subject_prefix,
        events_stream=stream,
        stream_exists=stream_exists,
        workers=sorted(workers),
        lanes=lane_statuses,
        outbox_rows=rows,
        outbox_oldest_seconds=(
            None if oldest_outbox is None else max(0.0, (now - oldest_outbox).total_seconds())
        ),
        leaders=leaders,
        dead_letters=dead_letters,
        detections={severity: detections.get(severity, 0) for severity in SEVERITIES} | detections,
    )


async def _oldest_unapplied_seconds(
    js: JetStreamContext, stream: str, lane: Lane, info: ConsumerInfo, now: datetime
) -> float | None:
    """Age of the lane's first message after its ack floor; None when nothing waits."""
    if not info.num_pending and not info.num_ack_pending:
        return None
    floor = info.ack_floor.stream_seq if info.ack_floor and info.ack_floor.stream_seq else 0
    try:
        first = await js.get_msg(stream, seq=floor + 1, subject=lane.filter_subject, next=True)
    except nats.js.errors.NotFoundError:
        return None
    if first.time is None:
        return None
    return max(0.0, (now - first.time).total_seconds())


# --- output --------------------------------------------------------------------------


def to_json(status: HubStatus) -> dict[str, Any]:
    return {
        "at": status.at.isoformat(),
        "prefix": status.prefix,
        "stream": status.events_stream,
        "streamExists": status.stream_exists,
        "workers": status.workers,
        "lanes": [
            {
                "lane": lane.lane,
                "owner": lane.owner,
                "pending": lane.pending,
                "unacked": lane.unacked,
                "oldestUnappliedSeconds": _rounded(lane.oldest_unapplied_seconds),
            }
            for lane in status.lanes
        ],
        "backlog": status.backlog,
        "outbox": {
            "rows": status.outbox_rows,
            "oldestSeconds": _rounded(status.outbox_oldest_seconds),
        },
        "leaders": status.leaders,
        "deadLetters": {
            "windowSeconds": DEAD_LETTER_WINDOW_SECONDS,
            "total": sum(status.dead_letters.values()),
            "byReason": status.dead_letters,
        },
        "detections": {
            "active": sum(status.detections.values()),
            "bySeverity": status.detections,
        },
    }


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def age(seconds: float | None) -> str:
    """A short age: `-`, `0.4s`, `42s`, `3m05s`, `2h10m`, `3d04h`."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _counts(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    if not total:
        return "none"
    return f"{total} (" + ", ".join(f"{k} {v}" for k, v in counts.items() if v) + ")"


def render(status: HubStatus, table: Table) -> str:
    """The screen; `table(headers, rows)` aligns the lanes (worker.cli.common.table)."""
    when = status.at.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    workers = len(status.workers)
    lines = [
        f"hub {status.prefix} · {workers} worker{'s' if workers != 1 else ''} · {when}",
        "",
    ]
    if not status.stream_exists:
        lines.append(
            f"stream {status.events_stream} does not exist: has `hub-worker run` started "
            "on this NATS?"
        )
    else:
        rows = [
            [
                lane.lane,
                lane.owner or "NONE",
                "-" if lane.pending is None else str(lane.pending),
                "-" if lane.unacked is None else str(lane.unacked),
                "no consumer" if lane.pending is None else age(lane.oldest_unapplied_seconds),
            ]
            for lane in status.lanes
        ]
        lines.append(table(["LANE", "OWNER", "PENDING", "UNACKED", "OLDEST UNAPPLIED"], rows))
    lines.append("")
    leaders = "  ".join(f"{role} {who or 'NONE'}" for role, who in status.leaders.items())
    lines += [
        f"backlog       {status.backlog} messages",
        f"outbox        {status.outbox_rows} rows, oldest {age(status.outbox_oldest_seconds)}",
        f"leaders       {leaders}",
        f"dead letters  {_counts(status.dead_letters)} in the last hour",
        f"detections    {_counts(status.detections)} active",
    ]
    if status.workers:
        lines.append(f"workers       {', '.join(status.workers)}")
    return "\n".join(lines)


# --- the command --------------------------------------------------------------------


STATUS_EPILOG = """\
examples:
  hub-worker status                     # one screen: lanes, outbox, leaders, dead letters
  hub-worker status --watch             # refreshed every 2 s until Ctrl-C
  hub-worker status --watch 10 --json   # one JSON object per line, every 10 s
  hub-worker status --json | jq '.lanes[] | select(.owner == null)'

Reads NATS (consumer info) and PostgreSQL (advisory locks, outbox, dead letters,
detections) directly: it answers whether or not a worker runs. A lane's OLDEST UNAPPLIED
is the age of the first message it has not applied; OWNER and the leaders are the
worker processes (host:pid) holding the lane's or the duty's lock, NONE when nobody does.
"""


# `--watch` without a number refreshes this often, seconds.
STATUS_WATCH_SECONDS = 2.0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = command_parser(
        commands,
        "status",
        help="lanes, outbox, leaders, dead letters and detections of the running hub",
        description="What the hub is doing now: each lane's owner, pending messages and "
        "oldest unapplied age; the outbox; who leads the relay, the sweep and the janitor; "
        "dead letters of the last hour by reason; active detections by severity.",
        epilog=STATUS_EPILOG,
    )
    parser.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    parser.add_argument(
        "--watch",
        nargs="?",
        const=STATUS_WATCH_SECONDS,
        type=parse_positive_seconds,
        metavar="SECONDS",
        help=f"refresh every SECONDS (default {STATUS_WATCH_SECONDS:g}) until Ctrl-C",
    )


_STATUS_NATS_ERRORS: tuple[type[Exception], ...] = (
    nats.errors.Error,
    nats.js.errors.Error,
    TimeoutError,
)


async def run_status(args: argparse.Namespace, settings: Settings, endpoints: Endpoints) -> int:
    watch: float | None = args.watch
    clear = watch is not None and not args.json and sys.stdout.isatty()
    with stop_on_signals() as received:
        try:
            async with (
                nats_connection(endpoints, settings.nats_auth, follow=watch is not None) as nc,
                database(endpoints) as conn,
            ):
                js = nc.jetstream()
                while True:
                    try:
                        current = await gather(conn, js, settings)
                    except _STATUS_NATS_ERRORS as err:
                        if watch is None:
                            raise CommandFailed(
                                EXIT_FAILURE, f"NATS did not answer ({describe(err)})"
                            ) from None
                        # A watch rides out a NATS restart: say so, look again.
                        error("status", f"NATS did not answer ({describe(err)}), retrying")
                        await asyncio.sleep(watch)
                        continue
                    if args.json:
                        indent = None if watch is not None else 2
                        print(json.dumps(to_json(current), indent=indent), flush=True)
                    else:
                        screen = render(current, table)
                        print(("\x1b[H\x1b[2J" if clear else "") + screen, flush=True)
                        if watch is not None and not clear:
                            print(flush=True)
                    if watch is None:
                        break
                    await asyncio.sleep(watch)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not received or task is None:
                raise
            task.uncancel()
    return EXIT_OK
