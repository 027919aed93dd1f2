"""`hub-worker alerts`: follow the detection (mapping, dead-letter) events live."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from datetime import datetime

import nats
import nats.errors
import nats.js.errors

from worker.cli.arguments import parse_positive_int, parse_severities, parse_since
from worker.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    CommandFailed,
    Endpoints,
    command_parser,
    describe,
    nats_connection,
    stop_on_signals,
)
from worker.client import AlertEvent, subscribe
from worker.config import Settings
from worker.events import DeadLetterEvent, DetectionEscalatedEvent, MappingEvent

ALERTS_EPILOG = """\
examples:
  hub-worker alerts                                  # everything from now on, one line each
  hub-worker alerts --severity high --kind model_degradation
  hub-worker alerts --session s1 --mappings --since 1h
  hub-worker alerts --since 2026-11-27T09:00:00Z --json | jq .detection.id
  hub-worker alerts --durable tty-high --severity high  # resumes where `tty-high` stopped
  hub-worker alerts --since all --count 10 --json    # the first 10 in the stream, then exit
  hub-worker alerts --deadletters                    # dead letters as they happen, too

Lines show the time, the change, the severity, the anomaly type, the session, the
occurrence count (a gauge, not a delta) and the detection id. Ctrl-C stops (exit 0).
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = command_parser(
        commands,
        "alerts",
        "follow detection events live",
        "Follow the detection events the worker publishes (stream HUB_OUT for the prefix "
        "hub), one line each, or one JSON object per line with --json. Rides out NATS "
        "restarts; an event is acked once printed.",
        ALERTS_EPILOG,
    )
    parser.add_argument(
        "--severity",
        action="append",
        type=parse_severities,
        default=[],
        metavar="LEVEL",
        help="high, medium or low; repeat or comma-separate for several",
    )
    parser.add_argument(
        "--kind",
        action="append",
        default=[],
        metavar="KIND",
        help="an anomaly type, e.g. model_degradation; repeatable",
    )
    parser.add_argument(
        "--session", action="append", default=[], metavar="SESSION", help="repeatable"
    )
    parser.add_argument(
        "--since",
        type=parse_since,
        metavar="WHEN",
        help="replay from the stream first: an ISO timestamp, a duration (30s, 10m, 1h, 2d), "
        "or 'all'; default: from now on",
    )
    parser.add_argument("--mappings", action="store_true", help="include mapping events")
    parser.add_argument(
        "--deadletters",
        action="store_true",
        help="include dead-letter announcements (hub.deadletter.>)",
    )
    parser.add_argument(
        "--durable",
        metavar="NAME",
        help="a durable consumer of this name: a later run resumes where this one stopped",
    )
    parser.add_argument(
        "--count", type=parse_positive_int, metavar="N", help="exit after N events (for scripts)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")


_RESET = "\x1b[0m"


_SEVERITY_COLORS = {"high": "\x1b[1;31m", "medium": "\x1b[33m", "low": "\x1b[36m"}


_CHANGE_COLORS = {
    "OPENED": "\x1b[1m",
    "ESCALATED": "\x1b[1;35m",
    "RESOLVED": "\x1b[32m",
    "REPEATED": "",
    "MAPPING": "\x1b[34m",
    "DEADLETTER": "\x1b[1;31m",
}


def _use_color() -> bool:
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def _paint(text: str, code: str, color: bool) -> str:
    return f"{code}{text}{_RESET}" if color and code else text


def _clock(moment: datetime) -> str:
    local = moment.astimezone()
    if local.date() == datetime.now().astimezone().date():
        return local.strftime("%H:%M:%S")
    return local.strftime("%Y-%m-%d %H:%M:%S")


def alert_line(event: AlertEvent, color: bool = False) -> str:
    """One readable line per event, e.g.
    `12:03:04 OPENED     high    MODEL_DEGRADATION  session=s1 count=1 id=…`."""
    when = _clock(event.occurred_at)
    if isinstance(event, MappingEvent):
        m = event.mapping
        label = _paint(f"{'MAPPING':<10}", _CHANGE_COLORS["MAPPING"], color)
        status = f"{m.status:<7}"
        extras = [f"session={m.session_id}", f"spoke={m.spoke_id}"]
        extras += [f"parent={m.parent_session_id}"] if m.parent_session_id else []
        extras += [f"task={m.task!r}"] if m.task else []
        extras += [f"was={event.previous_status}"] if event.previous_status else []
        return f"{when} {label} {status} {' '.join(extras)} id={m.id}"
    if isinstance(event, DeadLetterEvent):
        label = _paint(f"{'DEADLETTER':<10}", _CHANGE_COLORS["DEADLETTER"], color)
        error = " ".join(event.error.split())
        return (
            f"{when} {label} {event.reason}  subject={event.subject} "
            f"deliveries={event.deliveries} id={event.dead_letter_id} error={error!r}"
        )
    d = event.detection
    change = event.type.split(".", 1)[1].upper()
    label = _paint(f"{change:<10}", _CHANGE_COLORS.get(change, ""), color)
    severity = _paint(f"{d.severity:<6}", _SEVERITY_COLORS[d.severity], color)
    extras = [f"session={d.session_id}", f"count={d.occurrence_count}"]
    if isinstance(event, DetectionEscalatedEvent):
        extras.append(f"from={event.previous_severity}")
    if d.resolution:
        extras.append(f"resolution={d.resolution}")
    if d.resolved_by:
        extras.append(f"by={d.resolved_by}")
    return f"{when} {label} {severity} {d.anomaly_type}  {' '.join(extras)} id={d.id}"


async def run_alerts(args: argparse.Namespace, settings: Settings, endpoints: Endpoints) -> int:
    severities = [level for group in args.severity for level in group]
    color = not args.json and _use_color()
    shown = 0
    with stop_on_signals() as received:
        try:
            async with nats_connection(endpoints, settings.nats_auth, follow=True) as nc:
                js = nc.jetstream()
                try:
                    await js.stream_info(settings.out_stream)
                except nats.js.errors.NotFoundError:
                    raise CommandFailed(
                        EXIT_FAILURE,
                        f"stream {settings.out_stream} does not exist: has `hub-worker run` "
                        "started on this NATS?",
                    ) from None
                try:
                    alerts = subscribe(
                        js,
                        settings.subject_prefix,
                        durable=args.durable,
                        severities=severities,
                        kinds=args.kind,
                        sessions=args.session,
                        include_mappings=args.mappings,
                        include_deadletters=args.deadletters,
                        since=args.since,
                    )
                except ValueError as err:
                    raise CommandFailed(EXIT_USAGE, str(err)) from None
                async with alerts:
                    async for event in alerts:
                        line = event.model_dump_json() if args.json else alert_line(event, color)
                        print(line, flush=True)
                        shown += 1
                        if args.count is not None and shown >= args.count:
                            break
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not received or task is None:
                raise
            task.uncancel()
        except nats.js.errors.APIError as err:
            raise CommandFailed(EXIT_FAILURE, f"JetStream refused ({describe(err)})") from None
    return EXIT_OK
