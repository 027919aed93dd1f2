"""`hub-worker publish`: one session event, as a spoke would publish it."""

from __future__ import annotations

import argparse
from typing import Any

import nats
import nats.errors
import nats.js.errors
from pydantic import ValidationError

from worker.cli.arguments import parse_aware_timestamp, parse_json_object, parse_uuid
from worker.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    CommandFailed,
    Endpoints,
    command_parser,
    describe,
    nats_connection,
)
from worker.client import Spoke
from worker.config import Settings
from worker.domain import LIFECYCLES, SEVERITIES
from worker.events import EndedEvent, LifecycleEvent, SignalEvent, SpawnedEvent, validation_problems
from worker.subjects import inbound_capture

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


def _publish_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--spoke", default=default, metavar="SPOKE", help="the spoke id (required)")
    parser.add_argument(
        "--session", default=default, metavar="SESSION", help="the session id (required)"
    )
    parser.add_argument(
        "--metadata", type=parse_json_object, default=default, metavar="JSON", help="a JSON object"
    )
    parser.add_argument(
        "--event-id",
        type=parse_uuid,
        default=default,
        metavar="UUID",
        help="default: a new time-ordered UUID (version 7)",
    )
    parser.add_argument(
        "--occurred-at",
        type=parse_aware_timestamp,
        default=default,
        metavar="TIMESTAMP",
        help="RFC 3339 with offset; default: now",
    )


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = command_parser(
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
    sig.add_argument("--details", type=parse_json_object, metavar="JSON", help="a JSON object")
    sig.add_argument("--fingerprint", help="separates two problems of one kind in one session")


async def run_publish(args: argparse.Namespace, settings: Settings, endpoints: Endpoints) -> int:
    for option, value in (("--spoke", args.spoke), ("--session", args.session)):
        if not value:
            raise CommandFailed(EXIT_USAGE, f"{option} is required")
    common: dict[str, Any] = {
        "metadata": args.metadata,
        "event_id": args.event_id,
        "occurred_at": args.occurred_at,
    }
    async with nats_connection(endpoints, settings.nats_auth) as nc:
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
            raise CommandFailed(
                EXIT_USAGE, f"invalid event: {validation_problems(err, 3)}"
            ) from None
        except ValueError as err:
            raise CommandFailed(EXIT_USAGE, str(err)) from None
        except nats.js.errors.NoStreamResponseError:
            raise CommandFailed(
                EXIT_FAILURE,
                f"no stream captures {inbound_capture(settings.subject_prefix)}: has `hub-worker run` "
                f"created {settings.events_stream} on this NATS?",
            ) from None
        except (TimeoutError, nats.errors.Error) as err:
            raise CommandFailed(EXIT_FAILURE, f"publishing failed ({describe(err)})") from None
    print(event.event_id)
    return EXIT_OK
