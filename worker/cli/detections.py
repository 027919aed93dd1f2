"""`hub-worker detections` lists them from the database; `hub-worker resolve` resolves one
through a running worker (the NATS command)."""

from __future__ import annotations

import argparse
import json
from typing import Any, get_args

import nats
import nats.errors
import nats.js.errors
from pydantic import ValidationError

from worker import db
from worker.cli.arguments import parse_positive_int
from worker.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_REFUSED,
    CommandFailed,
    Endpoints,
    command_parser,
    database,
    nats_connection,
    stamp,
    table,
)
from worker.config import Settings
from worker.events import DetectionState, ResolveReply, ResolveRequest, validation_problems
from worker.subjects import resolve_command_subject

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


# The resolve request: how long to wait for a reply, and how often to ask.
RESOLVE_TIMEOUT_SECONDS = 5.0


RESOLVE_ATTEMPTS = 2


REFUSALS = frozenset({"not_found", "already_resolved", "unknown_account", "invalid_request"})


# What an operator may resolve with (auto_resolved is the worker's own).
RESOLUTIONS: tuple[str, ...] = get_args(ResolveRequest.model_fields["resolution"].annotation)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `detections` and `resolve`."""
    _register_detections(commands)
    _register_resolve(commands)


def _register_detections(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = command_parser(
        commands,
        "detections",
        "list active (or recent) detections",
        "List the active detections from the database as a table (--json: a JSON array of "
        "detections as in the outbound events).",
        DETECTIONS_EPILOG,
    )
    parser.add_argument("--all", action="store_true", help="resolved ones too, latest changed")
    parser.add_argument("--session", metavar="SESSION", help="only this session's")
    parser.add_argument(
        "--limit", type=parse_positive_int, default=50, metavar="N", help="default: 50"
    )
    parser.add_argument("--json", action="store_true", help="a JSON array")


def _register_resolve(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = command_parser(
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


def detection_json(detection: DetectionState) -> dict[str, Any]:
    dumped: dict[str, Any] = detection.model_dump(mode="json")
    return dumped


async def run_detections(args: argparse.Namespace, settings: Settings, endpoints: Endpoints) -> int:
    async with database(endpoints) as conn:
        found = await db.list_detections(
            conn, include_resolved=args.all, session_id=args.session, limit=args.limit
        )
    if args.json:
        print(json.dumps([detection_json(d) for d in found]))
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
            stamp(d.created_at),
            stamp(d.updated_at),
        ]
        if args.all:
            row += [stamp(d.resolved_at), d.resolution or "-", d.resolved_by or "-"]
        rows.append(row)
    print(table(headers, rows))
    return EXIT_OK


async def run_resolve(args: argparse.Namespace, settings: Settings, endpoints: Endpoints) -> int:
    subject = resolve_command_subject(settings.subject_prefix)
    body = json.dumps(
        {"detectionId": args.detection_id, "resolvedBy": args.by, "resolution": args.resolution}
    ).encode()
    timed_out = False
    async with nats_connection(endpoints, settings.nats_auth) as nc:
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
            EXIT_FAILURE, f"unexpected reply from the worker ({validation_problems(err, 3)})"
        ) from None
    if reply.ok and reply.detection is not None:
        d = reply.detection
        if args.json:
            print(json.dumps(detection_json(d)))
        else:
            print(
                f"resolved {d.id}: {d.anomaly_type} {d.severity} session={d.session_id} "
                f"count={d.occurrence_count} resolution={d.resolution} by={d.resolved_by} "
                f"at {stamp(d.resolved_at)}"
            )
        return EXIT_OK
    if reply.error is None:
        raise CommandFailed(EXIT_FAILURE, "unexpected reply from the worker (no error given)")
    code, message = reply.error.code, reply.error.message
    if code == "already_resolved" and timed_out:
        message += " (an earlier attempt timed out and may have resolved it)"
    raise CommandFailed(EXIT_REFUSED if code in REFUSALS else EXIT_FAILURE, f"{code}: {message}")
