"""Operator commands of `hub-worker`: publish, alerts, detections, resolve, deadletters, status.

`register(commands)` adds them to the `hub-worker` argument parser (its
sub-parsers action) and `await dispatch(args, settings, endpoints)` runs the one
chosen, returning the exit code:

- 0 done;
- 1 failed (a server unreachable, no worker answering, an unexpected reply);
- 2 usage (a bad or missing argument, a missing endpoint);
- 3 not found or refused (the resolve command's refusals, unknown dead letters).

Errors are one sentence on stderr, prefixed with the command; results go to
stdout. Database commands apply pending migrations first, like `accounts`.
`python -m worker.cli_ops …` runs them stand-alone against HUB_DATABASE_URL and
HUB_NATS_URL (no embedded servers).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID

import asyncpg
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from pydantic import ValidationError

from worker import db, status
from worker.client import AlertEvent, Spoke, publishable_headers, subscribe
from worker.config import ConfigError, NatsAuth, Settings
from worker.connection import connect_options
from worker.domain import LIFECYCLES, DeadLetterReason
from worker.events import (
    DeadLetterEvent,
    DetectionEscalatedEvent,
    DetectionState,
    EndedEvent,
    LifecycleEvent,
    MappingEvent,
    ResolveReply,
    SignalEvent,
    SpawnedEvent,
)
from worker.subjects import resolve_command_subject

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3

COMMANDS = frozenset({"publish", "alerts", "detections", "resolve", "deadletters", "status"})
# The commands that read or write the database (the others need NATS only).
DATABASE_COMMANDS = frozenset({"detections", "deadletters", "status"})

# Where the commands look for NATS when HUB_NATS_URL is unset: the port an
# embedded `hub-worker run` prefers.
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
# The resolve request: how long to wait for a reply, and how often to ask.
RESOLVE_TIMEOUT_SECONDS = 5.0
RESOLVE_ATTEMPTS = 2
REFUSALS = frozenset({"not_found", "already_resolved", "unknown_account", "invalid_request"})
DEAD_LETTER_REASONS = tuple(reason.value for reason in DeadLetterReason)
SEVERITIES = ("high", "medium", "low")
RESOLUTIONS = ("acknowledged", "dismissed", "escalated", "fixed")


class Endpoints(Protocol):
    """Where the servers are (`worker.cli.Endpoints` fits)."""

    @property
    def database_url(self) -> str: ...

    @property
    def nats_urls(self) -> list[str]: ...


class CommandFailed(Exception):
    """Ends a command with an exit code and a one-sentence message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --- the parsers ---------------------------------------------------------------------

PUBLISH_EPILOG = """\
examples:
  hub-worker publish --spoke laptop --session s1 spawned --parent coord-1 --workspace ws-1 \\
      --task-id T-7 --task "fix the build"
  hub-worker publish --spoke laptop --session s1 heartbeat
  hub-worker publish --spoke laptop --session s1 completed --reason "tests pass"
  hub-worker publish --spoke laptop --session s1 signal model_degradation --severity high \\
      --details '{"score": 0.2}' --fingerprint gpt-4o
  hub-worker publish --spoke laptop --session s1 --event-id 6f1c1d2e-8a53-4d0e-9a3b-5f8a3a1f2b10 \\
      --occurred-at 2026-11-27T10:15:00+00:00 started   # an explicit id: publishing it twice is safe

Prints the eventId. --spoke, --session, --metadata, --event-id and --occurred-at may
also follow the event name.
"""

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

DETECTIONS_EPILOG = """\
examples:
  hub-worker detections                     # active ones, highest severity first
  hub-worker detections --session s1
  hub-worker detections --all --limit 20    # the 20 changed last, resolved ones too
  hub-worker detections --json | jq '.[].id'
"""

RESOLVE_EPILOG = """\
examples:
  hub-worker resolve 0b4c0d3e-57a4-4f44-9a57-0f0e0d0c0b0a --by ops-alice --resolution fixed
  hub-worker resolve "$ID" --by ops-alice --resolution dismissed --json

Sends a request on hub.cmd.detection.resolve (HUB_SUBJECT_PREFIX), answered by a running worker (timeout 5 s,
asked once more after a timeout). Exit 3 when the worker refuses: not_found,
already_resolved, unknown_account, invalid_request. The account must exist
(`hub-worker accounts add ID`).
"""

DEADLETTERS_EPILOG = """\
examples:
  hub-worker deadletters                           # the 50 newest
  hub-worker deadletters --reason spoke_mismatch --limit 10
  hub-worker deadletters --json | jq -r '.[].payloadBase64' | head -1 | base64 -d
  hub-worker deadletters replay 17 18              # after fixing what made them fail
"""

REPLAY_EPILOG = """\
examples:
  hub-worker deadletters replay 17
  hub-worker deadletters replay 17 18 19

Republishes each dead letter's original bytes, with its stored headers, to its
original subject through JetStream. Replaying is safe: the worker recognises an
eventId it already applied and changes nothing, and a message that still cannot be
applied is dead-lettered again. The replay is recorded (replay_count) before it is
published, with Nats-Msg-Id deadletter-ID-replay-N, and confirmed (replayed_at)
once JetStream stored it; a replay that failed half-way is retried under the same
number, so running the command again does not publish it twice (within the
stream's 2-minute duplicate window; after that the worker's ledger still applies
it once). Runs under the runtime role (sql/grants.sql). Exit 3 when an id does
not exist (the others are still replayed).
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the operator commands to the `hub-worker` parser's sub-commands."""
    _register_publish(commands)
    _register_alerts(commands)
    _register_detections(commands)
    _register_resolve(commands)
    _register_deadletters(commands)
    _register_status(commands)


def _parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help: str,
    description: str,
    epilog: str,
) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        name,
        help=help,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(ops_command=name)
    return parser


def _publish_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--spoke", default=default, metavar="SPOKE", help="the spoke id (required)")
    parser.add_argument(
        "--session", default=default, metavar="SESSION", help="the session id (required)"
    )
    parser.add_argument(
        "--metadata", type=_json_object, default=default, metavar="JSON", help="a JSON object"
    )
    parser.add_argument(
        "--event-id", type=_uuid, default=default, metavar="UUID", help="default: a new uuid4"
    )
    parser.add_argument(
        "--occurred-at",
        type=_aware_timestamp,
        default=default,
        metavar="TIMESTAMP",
        help="RFC 3339 with offset; default: now",
    )


def _register_publish(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = _parser(
        commands,
        "publish",
        "publish one session event as a spoke",
        "Publish one session event as a spoke would, through JetStream (validated first, "
        "eventId as Nats-Msg-Id), and print its eventId.",
        PUBLISH_EPILOG,
    )
    _publish_options(parser, None)
    # The same options after the event name; SUPPRESS keeps values given before it.
    after = argparse.ArgumentParser(add_help=False)
    _publish_options(after, argparse.SUPPRESS)
    events = parser.add_subparsers(dest="event", required=True, metavar="EVENT")
    spawned = events.add_parser("spawned", parents=[after], help="the session was spawned")
    spawned.add_argument("--parent", metavar="SESSION", help="the coordinator's session id")
    spawned.add_argument("--workspace", metavar="ID", help="the workspace id")
    spawned.add_argument("--task-id", metavar="ID", help="the task id")
    spawned.add_argument("--task", metavar="NAME", help="the task's display name")
    for lifecycle, text in (
        ("started", "the session started"),
        ("heartbeat", "the session is alive"),
        ("archived", "the session is closed for good (resolves its detections)"),
    ):
        events.add_parser(lifecycle, parents=[after], help=text)
    for lifecycle, text in (
        ("completed", "the session ended well"),
        ("failed", "the session failed"),
        ("aborted", "the session was stopped"),
    ):
        ended = events.add_parser(lifecycle, parents=[after], help=text)
        ended.add_argument("--reason", help="why (at most 1024 characters)")
    sig = events.add_parser("signal", parents=[after], help="a heuristic signal (a detection)")
    sig.add_argument("kind", metavar="KIND", help="e.g. model_degradation, high_error_count")
    sig.add_argument("--severity", required=True, choices=SEVERITIES)
    sig.add_argument("--details", type=_json_object, metavar="JSON", help="a JSON object")
    sig.add_argument("--fingerprint", help="separates two problems of one kind in one session")


def _register_alerts(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = _parser(
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
        type=_severity_list,
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
        type=_since,
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
        "--count", type=_positive_int, metavar="N", help="exit after N events (for scripts)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")


def _register_detections(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = _parser(
        commands,
        "detections",
        "list active (or recent) detections",
        "List the active detections from the database as a table (--json: a JSON array of "
        "detections as in the outbound events).",
        DETECTIONS_EPILOG,
    )
    parser.add_argument("--all", action="store_true", help="resolved ones too, latest changed")
    parser.add_argument("--session", metavar="SESSION", help="only this session's")
    parser.add_argument("--limit", type=_positive_int, default=50, metavar="N", help="default: 50")
    parser.add_argument("--json", action="store_true", help="a JSON array")


def _register_resolve(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = _parser(
        commands,
        "resolve",
        "resolve a detection (through the worker)",
        "Resolve an active detection through the NATS command hub.cmd.detection.resolve and "
        "print it as resolved.",
        RESOLVE_EPILOG,
    )
    parser.add_argument("detection_id", metavar="DETECTION_ID")
    parser.add_argument("--by", required=True, metavar="ACCOUNT", help="an existing account id")
    parser.add_argument("--resolution", required=True, choices=RESOLUTIONS)
    parser.add_argument("--json", action="store_true", help="print the detection as JSON")


def _list_options(parser: argparse.ArgumentParser, default: Any, limit: Any) -> None:
    parser.add_argument(
        "--reason", choices=DEAD_LETTER_REASONS, default=default, help="only this reason"
    )
    parser.add_argument(
        "--limit", type=_positive_int, default=limit, metavar="N", help="default: 50"
    )
    parser.add_argument(
        "--json", action="store_true", default=default, help="a JSON array, payloads included"
    )


def _register_deadletters(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = _parser(
        commands,
        "deadletters",
        "list dead letters, or replay them",
        "List the messages the worker could not apply (newest first), or replay them once "
        "their cause is fixed.",
        DEADLETTERS_EPILOG,
    )
    _list_options(parser, None, 50)
    after = argparse.ArgumentParser(add_help=False)
    _list_options(after, argparse.SUPPRESS, argparse.SUPPRESS)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.add_parser("list", parents=[after], help="list dead letters (the default)")
    replay = actions.add_parser(
        "replay",
        help="republish dead letters to their original subjects",
        description="Republish dead letters to their original subjects.",
        epilog=REPLAY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    replay.add_argument("ids", nargs="+", type=_positive_int, metavar="ID")


# --- argument types (argparse turns their errors into exit 2) ------------------------


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not valid JSON: {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r}")
    return value


def _uuid(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a UUID: {text!r}") from None


def _timestamp(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 timestamp: {text!r}") from None


def _aware_timestamp(text: str) -> datetime:
    moment = _timestamp(text)
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"needs an offset like +00:00 or Z: {text!r}")
    return moment


_DURATION_RE = re.compile(r"^(\d+)\s*(s|m|h|d|w)$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _since(text: str) -> datetime | Literal["all"]:
    """'all', a duration back from now (10m, 1h), or a timestamp (local time without offset)."""
    text = text.strip()
    if text == "all":
        return "all"
    if match := _DURATION_RE.match(text):
        seconds = int(match.group(1)) * _DURATION_UNITS[match.group(2)]
        return datetime.now(UTC) - timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a timestamp, a duration like 10m or 1h, or 'all', got {text!r}"
        ) from None
    return moment if moment.tzinfo is not None else moment.astimezone()


def _severity_list(text: str) -> list[str]:
    levels = [s.strip().lower() for s in text.split(",") if s.strip()]
    for level in levels:
        if level not in SEVERITIES:
            raise argparse.ArgumentTypeError(f"expected high, medium or low, got {level!r}")
    return levels


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value}")
    return value


# --- running them --------------------------------------------------------------------


async def dispatch(args: argparse.Namespace, settings: Settings, endpoints: Endpoints) -> int:
    """Run the operator command `args` was parsed for; returns the exit code."""
    command = str(getattr(args, "ops_command", None))
    handler = _HANDLERS.get(command)
    if handler is None:
        print(f"hub-worker: {command!r} is not an operator command", file=sys.stderr)
        return EXIT_USAGE
    try:
        return await handler(args, settings, endpoints)
    except CommandFailed as failed:
        _error(command, failed.message)
        return failed.code
    except BrokenPipeError:
        # The reader went away (`| head`): nothing more to say to it.
        _silence_stdout()
        return EXIT_OK
    except Exception as err:
        _error(command, f"unexpected error: {_describe(err)}")
        return EXIT_FAILURE


def _error(command: str, message: str) -> None:
    print(f"hub-worker {command}: {message}", file=sys.stderr, flush=True)


def _describe(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _silence_stdout() -> None:
    # Python would report the broken pipe again when flushing stdout at exit.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def redact(url: str) -> str:
    """A URL without its credentials, for messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


async def _ignore_error(err: Exception) -> None:
    """The commands report failures themselves; nats-py would log each one with a traceback."""


@asynccontextmanager
async def _nats(
    endpoints: Endpoints, auth: NatsAuth, *, follow: bool = False
) -> AsyncIterator[NATS]:
    """A NATS connection that fails fast when the server is not there.

    `follow`: once connected, reconnect for as long as it takes (a long-running command
    rides out a NATS restart).
    """
    urls = list(endpoints.nats_urls) or [DEFAULT_NATS_URL]
    try:
        nc = await nats.connect(
            servers=urls,
            name="hub-worker-ops",
            connect_timeout=3,
            reconnect_time_wait=1,
            max_reconnect_attempts=1,
            error_cb=_ignore_error,
            **connect_options(auth),
        )
    except (TimeoutError, nats.errors.Error, OSError) as err:
        where = ", ".join(redact(u) for u in urls)
        raise CommandFailed(
            EXIT_FAILURE, f"cannot reach NATS at {where} ({_describe(err)})"
        ) from None
    if follow:
        nc.options["max_reconnect_attempts"] = -1
    try:
        yield nc
    finally:
        if not nc.is_closed:
            # Acks are fire-and-forget publishes: get them out before closing.
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await nc.flush(timeout=2)
            await nc.close()


# Failing to connect: the server is not there, or refuses us (password, no such database).
_DB_CONNECT_ERRORS: tuple[type[Exception], ...] = (*db.CONNECTION_ERRORS, asyncpg.PostgresError)


@asynccontextmanager
async def _database(endpoints: Endpoints) -> AsyncIterator[db.Connection]:
    if not endpoints.database_url:
        raise CommandFailed(EXIT_USAGE, "no database: set HUB_DATABASE_URL")
    try:
        conn = await db.connect(endpoints.database_url, application_name="hub-worker:ops")
    except _DB_CONNECT_ERRORS as err:
        raise CommandFailed(EXIT_FAILURE, f"cannot reach the database ({_describe(err)})") from None
    try:
        await db.migrate(conn)
        yield conn
    except db.CONNECTION_ERRORS as err:
        raise CommandFailed(EXIT_FAILURE, f"lost the database ({_describe(err)})") from None
    finally:
        await conn.close()


def _validation_message(err: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
        for e in err.errors(include_url=False)[:3]
    )


# --- publish ---------------------------------------------------------------------------


async def _publish(args: argparse.Namespace, settings: Settings, endpoints: Endpoints) -> int:
    for option, value in (("--spoke", args.spoke), ("--session", args.session)):
        if not value:
            raise CommandFailed(EXIT_USAGE, f"{option} is required")
    common: dict[str, Any] = {
        "metadata": args.metadata,
        "event_id": args.event_id,
        "occurred_at": args.occurred_at,
    }
    async with _nats(endpoints, settings.nats_auth) as nc:
        try:
            spoke = Spoke(nc, args.spoke, settings.subject_prefix)
            event: LifecycleEvent | SpawnedEvent | EndedEvent | SignalEvent
            if args.event == "signal":
                event = await spoke.signal(
                    args.session,
                    args.kind,
                    args.severity,
                    details=args.details,
                    fingerprint=args.fingerprint,
                    **common,
                )
            else:
                lifecycle = next(lc for lc in LIFECYCLES if lc == args.event)
                fields: dict[str, Any] = {}
                if lifecycle == "spawned":
                    fields = {
                        "parent_session_id": args.parent,
                        "workspace_id": args.workspace,
                        "task_id": args.task_id,
                        "task": args.task,
                    }
                elif lifecycle in ("completed", "failed", "aborted"):
                    fields = {"reason": args.reason}
                event = await spoke.lifecycle(lifecycle, args.session, **common, **fields)
        except ValidationError as err:
            raise CommandFailed(EXIT_USAGE, f"invalid event: {_validation_message(err)}") from None
        except ValueError as err:
            raise CommandFailed(EXIT_USAGE, str(err)) from None
        except nats.js.errors.NoStreamResponseError:
            raise CommandFailed(
                EXIT_FAILURE,
                f"no stream captures {settings.subject_prefix}.spoke.>: has `hub-worker run` "
                f"created {settings.events_stream} on this NATS?",
            ) from None
        except (TimeoutError, nats.errors.Error) as err:
            raise CommandFailed(EXIT_FAILURE, f"publishing failed ({_describe(err)})") from None
    print(event.event_id)
    return EXIT_OK


# --- alerts ----------------------------------------------------------------------------

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


@contextmanager
def _stop_on_signals() -> Iterator[list[int]]:
    """SIGINT/SIGTERM end the current task quietly; the list holds the signal received."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    received: list[int] = []

    def stop(signum: int) -> None:
        received.append(signum)
        if task is not None:
            task.cancel()

    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop, signum)
            installed.append(signum)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread, or no signals here: Ctrl-C works as usual
    try:
        yield received
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


async def _alerts(args: argparse.Namespace, settings: Settings, endpoints: Endpoints) -> int:
    severities = [level for group in args.severity for level in group]
    color = not args.json and _use_color()
    shown = 0
    with _stop_on_signals() as received:
        try:
            async with _nats(endpoints, settings.nats_auth, follow=True) as nc:
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
            raise CommandFailed(EXIT_FAILURE, f"JetStream refused ({_describe(err)})") from None
    return EXIT_OK


# --- detections ----------------------------------------------------------------------


def _stamp(moment: datetime | None) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns aligned with two spaces between them; the last one is not padded."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = [c.ljust(w) for c, w in zip(cells[:-1], widths[:-1], strict=True)]
        return "  ".join([*padded, cells[-1]]).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def _detection_json(detection: DetectionState) -> dict[str, Any]:
    dumped: dict[str, Any] = detection.model_dump(mode="json")
    return dumped


async def _detections(args: argparse.Namespace, settings: Settings, endpoints: Endpoints) -> int:
    async with _database(endpoints) as conn:
        found = await db.list_detections(
            conn, include_resolved=args.all, session_id=args.session, limit=args.limit
        )
    if args.json:
        print(json.dumps([_detection_json(d) for d in found]))
        return EXIT_OK
    if not found:
        what = "detections" if args.all else "active detections"
        # A result, not an error: on stdout.
        print(f"no {what}" + (f" for session {args.session}" if args.session else ""))
        return EXIT_OK
    headers = ["ID", "SEVERITY", "TYPE", "SESSION", "COUNT", "OPENED", "UPDATED"]
    if args.all:
        headers += ["RESOLVED", "RESOLUTION", "BY"]
    rows = []
    for d in found:
        row = [
            d.id,
            d.severity,
            d.anomaly_type,
            d.session_id,
            str(d.occurrence_count),
            _stamp(d.created_at),
            _stamp(d.updated_at),
        ]
        if args.all:
            row += [_stamp(d.resolved_at), d.resolution or "-", d.resolved_by or "-"]
        rows.append(row)
    print(table(headers, rows))
    return EXIT_OK


# --- resolve ---------------------------------------------------------------------------


async def _resolve(args: argparse.Namespace, settings: Settings, endpoints: Endpoints) -> int:
    subject = resolve_command_subject(settings.subject_prefix)
    body = json.dumps(
        {"detectionId": args.detection_id, "resolvedBy": args.by, "resolution": args.resolution}
    ).encode()
    timed_out = False
    async with _nats(endpoints, settings.nats_auth) as nc:
        for attempt in range(1, RESOLVE_ATTEMPTS + 1):
            try:
                msg = await nc.request(subject, body, timeout=RESOLVE_TIMEOUT_SECONDS)
                break
            except nats.errors.NoRespondersError:
                raise CommandFailed(
                    EXIT_FAILURE,
                    f"no worker answers {subject}: is `hub-worker run` running on this NATS?",
                ) from None
            except TimeoutError:  # nats-py's own TimeoutError is one too
                timed_out = True
                if attempt == RESOLVE_ATTEMPTS:
                    raise CommandFailed(
                        EXIT_FAILURE,
                        f"no reply on {subject} within {RESOLVE_TIMEOUT_SECONDS:g} s "
                        f"({RESOLVE_ATTEMPTS} attempts)",
                    ) from None
    try:
        reply = ResolveReply.model_validate_json(msg.data)
    except ValidationError as err:
        raise CommandFailed(
            EXIT_FAILURE, f"unexpected reply from the worker ({_validation_message(err)})"
        ) from None
    if reply.ok and reply.detection is not None:
        d = reply.detection
        if args.json:
            print(json.dumps(_detection_json(d)))
        else:
            print(
                f"resolved {d.id}: {d.anomaly_type} {d.severity} session={d.session_id} "
                f"count={d.occurrence_count} resolution={d.resolution} by={d.resolved_by} "
                f"at {_stamp(d.resolved_at)}"
            )
        return EXIT_OK
    if reply.error is None:
        raise CommandFailed(EXIT_FAILURE, "unexpected reply from the worker (no error given)")
    code, message = reply.error.code, reply.error.message
    if code == "already_resolved" and timed_out:
        message += " (an earlier attempt timed out and may have resolved it)"
    raise CommandFailed(EXIT_REFUSED if code in REFUSALS else EXIT_FAILURE, f"{code}: {message}")


# --- dead letters ------------------------------------------------------------------------


def _dead_letter_json(letter: db.DeadLetter) -> dict[str, Any]:
    return {
        "id": letter.id,
        "createdAt": letter.created_at.isoformat(),
        "reason": letter.reason,
        "subject": letter.subject,
        "error": letter.error,
        "deliveries": letter.deliveries,
        "headers": letter.headers,
        "payloadBase64": base64.b64encode(letter.payload).decode(),
        "replayedAt": letter.replayed_at.isoformat() if letter.replayed_at else None,
        "replayCount": letter.replay_count,
    }


async def _deadletters(args: argparse.Namespace, settings: Settings, endpoints: Endpoints) -> int:
    if args.action == "replay":
        return await _replay(args, settings, endpoints)
    async with _database(endpoints) as conn:
        letters = await db.list_dead_letters(conn, reason=args.reason, limit=args.limit)
    if args.json:
        print(json.dumps([_dead_letter_json(letter) for letter in letters]))
        return EXIT_OK
    if not letters:
        print(
            "no dead letters" + (f" with reason {args.reason}" if args.reason else ""),
            file=sys.stderr,
        )
        return EXIT_OK
    rows = [
        [
            str(letter.id),
            _stamp(letter.created_at),
            letter.reason,
            letter.subject,
            f"{letter.replay_count}x" if letter.replay_count else "-",
            " ".join(letter.error.split()),
        ]
        for letter in letters
    ]
    print(table(["ID", "CREATED", "REASON", "SUBJECT", "REPLAYED", "ERROR"], rows))
    return EXIT_OK


def replay_msg_id(dead_letter_id: int, replay: int) -> str:
    """The Nats-Msg-Id of replay number `replay` of a dead letter: the same for every
    attempt at one replay (JetStream drops a retry that finds the first one stored),
    distinct from the original message's and from other replays'."""
    return f"deadletter-{dead_letter_id}-replay-{replay}"


async def _replay(args: argparse.Namespace, settings: Settings, endpoints: Endpoints) -> int:
    ids = list(dict.fromkeys(args.ids))
    async with _database(endpoints) as conn:
        letters = {letter.id: letter for letter in await db.dead_letters_by_id(conn, ids)}
        missing = [i for i in ids if i not in letters]
        if letters:
            async with _nats(endpoints, settings.nats_auth) as nc:
                js = nc.jetstream()
                for letter in letters.values():
                    # Recorded first: a publish that fails, or a confirmation that does,
                    # leaves the replay begun, and retrying it reuses its Nats-Msg-Id.
                    try:
                        replay = await db.begin_dead_letter_replay(conn, letter.id)
                    except asyncpg.InsufficientPrivilegeError as err:
                        raise CommandFailed(
                            EXIT_FAILURE,
                            f"cannot record the replay of dead letter {letter.id} ({err}), so "
                            "nothing was published: apply sql/grants.sql (`hub-worker migrate` "
                            "with HUB_DATABASE_RUNTIME_ROLE)",
                        ) from None
                    if replay is None:
                        missing.append(letter.id)
                        continue
                    msg_id = replay_msg_id(letter.id, replay)
                    headers = publishable_headers(letter.headers, msg_id)
                    headers["Hub-Replay-Of"] = str(letter.id)
                    try:
                        ack = await js.publish(
                            letter.subject,
                            letter.payload,
                            headers=headers,
                            timeout=RESOLVE_TIMEOUT_SECONDS,
                        )
                    except nats.js.errors.NoStreamResponseError:
                        raise CommandFailed(
                            EXIT_FAILURE,
                            f"no stream captures {letter.subject}: has `hub-worker run` "
                            f"created {settings.events_stream} on this NATS?",
                        ) from None
                    except (TimeoutError, nats.errors.Error) as err:
                        raise CommandFailed(
                            EXIT_FAILURE,
                            f"replaying dead letter {letter.id} failed ({_describe(err)}); "
                            "running the same replay again is safe",
                        ) from None
                    try:
                        await db.mark_dead_letter_replayed(conn, letter.id, replay)
                    except asyncpg.InsufficientPrivilegeError as err:
                        raise CommandFailed(
                            EXIT_FAILURE,
                            f"dead letter {letter.id} was republished but the replay could "
                            f"not be confirmed ({err}): apply sql/grants.sql (`hub-worker "
                            "migrate` with HUB_DATABASE_RUNTIME_ROLE); running the same "
                            "replay again is safe",
                        ) from None
                    again = " (already in the stream: a retried replay)" if ack.duplicate else ""
                    print(
                        f"replayed dead letter {letter.id} ({letter.reason}) to {letter.subject} "
                        f"as {ack.stream} #{ack.seq}, Nats-Msg-Id {msg_id}, replay {replay}"
                        f"{again}",
                        flush=True,
                    )
    for i in missing:
        _error("deadletters", f"no dead letter with id {i}")
    return EXIT_REFUSED if missing else EXIT_OK


# --- status --------------------------------------------------------------------------

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


def _register_status(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = _parser(
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
        type=_positive_seconds,
        metavar="SECONDS",
        help=f"refresh every SECONDS (default {STATUS_WATCH_SECONDS:g}) until Ctrl-C",
    )


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


_STATUS_NATS_ERRORS: tuple[type[Exception], ...] = (
    nats.errors.Error,
    nats.js.errors.Error,
    TimeoutError,
)


async def _status(args: argparse.Namespace, settings: Settings, endpoints: Endpoints) -> int:
    watch: float | None = args.watch
    clear = watch is not None and not args.json and sys.stdout.isatty()
    with _stop_on_signals() as received:
        try:
            async with (
                _nats(endpoints, settings.nats_auth, follow=watch is not None) as nc,
                _database(endpoints) as conn,
            ):
                js = nc.jetstream()
                while True:
                    try:
                        current = await status.gather(conn, js, settings)
                    except _STATUS_NATS_ERRORS as err:
                        if watch is None:
                            raise CommandFailed(
                                EXIT_FAILURE, f"NATS did not answer ({_describe(err)})"
                            ) from None
                        # A watch rides out a NATS restart: say so, look again.
                        _error("status", f"NATS did not answer ({_describe(err)}), retrying")
                        await asyncio.sleep(watch)
                        continue
                    if args.json:
                        indent = None if watch is not None else 2
                        print(json.dumps(status.to_json(current), indent=indent), flush=True)
                    else:
                        screen = status.render(current, table)
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


Handler = Callable[[argparse.Namespace, Settings, Endpoints], Awaitable[int]]
_HANDLERS: dict[str, Handler] = {
    "publish": _publish,
    "alerts": _alerts,
    "detections": _detections,
    "resolve": _resolve,
    "deadletters": _deadletters,
    "status": _status,
}


# --- stand-alone ---------------------------------------------------------------------


@dataclass(frozen=True)
class _EnvEndpoints:
    database_url: str
    nats_urls: list[str]


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m worker.cli_ops COMMAND …`: the operator commands without `hub-worker`'s
    embedded servers, against HUB_DATABASE_URL and HUB_NATS_URL."""
    parser = argparse.ArgumentParser(
        prog="hub-worker",
        description="Operator commands of the agent hub's coordination worker.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register(commands)
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as err:
        print(f"hub-worker: configuration error: {err}", file=sys.stderr)
        return EXIT_USAGE
    endpoints = _EnvEndpoints(settings.database_url or "", list(settings.nats_urls or []))
    return asyncio.run(dispatch(args, settings, endpoints))


if __name__ == "__main__":
    raise SystemExit(main())
