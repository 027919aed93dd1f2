"""`hub-worker outbox`: the outbound events JetStream refused for good (set aside), and
putting one back into the outbox once its cause is fixed."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
from typing import Any

import asyncpg

from worker import db
from worker.cli.arguments import parse_positive_seconds
from worker.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_REFUSED,
    CommandFailed,
    Endpoints,
    action_parser,
    command_parser,
    database,
    error,
    listing_actions,
    stamp,
    table,
)
from worker.config import Settings
from worker.outbound import Standing, standing

OUTBOX_EPILOG = """\
examples:
  hub-worker outbox                          # the 50 newest rows set aside
  hub-worker outbox --json | jq '.[] | {id, reason, standing}'
  hub-worker outbox republish 41             # after fixing what refused it

STANDING says whether republishing the event is safe: `current` (its detection or
mapping has not changed since, so it is still the last word about it),
`superseded` (it changed since and subscribers were sent the newer state: the
event is refused, it would show them an older one), `announcement` (a dead
letter's), `unreadable` (not an event the worker wrote).
"""

REPUBLISH_EPILOG = """\
examples:
  hub-worker outbox republish 41
  hub-worker outbox republish 41 42 --no-wait

Puts each row back into the outbox as it was written, with the same eventId (so the
same Nats-Msg-Id: JetStream drops it should it have been stored after all), and
records when (republished_at): a row is republished once. The relay publishes it;
the command waits up to --wait seconds to say whether it was published or set aside
again (as a new row, with the reason). A `superseded` row is refused. Runs under the
runtime role (sql/grants.sql). Exit 3 when a row does not exist, was republished
before or is refused; 1 when one was set aside again.
"""

# How often the outcome of a republish is looked at while waiting, seconds.
OUTCOME_POLL_SECONDS = 0.2
REPUBLISHABLE: frozenset[Standing] = frozenset({"current", "announcement"})


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = command_parser(
        commands,
        "outbox",
        "list outbound events set aside, or republish them",
        "List the outbound events JetStream refused for good (newest first), which the relay "
        "set aside so that the events behind them were published; or put them back into the "
        "outbox once the cause is fixed.",
        OUTBOX_EPILOG,
    )
    actions = listing_actions(parser, "the rows set aside")
    republish = action_parser(
        actions,
        "republish",
        "put rows set aside back into the outbox",
        "Put outbound events set aside back into the outbox, for the relay.",
        REPUBLISH_EPILOG,
    )
    republish.add_argument(
        "--wait",
        type=parse_positive_seconds,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for the relay (default: 10)",
    )
    republish.add_argument("--no-wait", action="store_true", help="do not wait for the relay")


def _row_json(row: db.SetAsideRow, state: Standing) -> dict[str, Any]:
    return {
        "id": row.id,
        "eventId": str(row.event_id),
        "subject": row.subject,
        "aggregate": row.aggregate,
        "createdAt": row.created_at.isoformat(),
        "setAsideAt": row.set_aside_at.isoformat(),
        "reason": row.reason,
        "error": row.error,
        "standing": state,
        "republishedAt": row.republished_at.isoformat() if row.republished_at else None,
        "payloadSize": len(row.payload),
        "payloadBase64": base64.b64encode(row.payload).decode(),
    }


async def _standing(conn: db.Connection, row: db.SetAsideRow) -> Standing:
    """The row's standing against its detection's or mapping's state now (locked FOR
    SHARE until the caller's transaction ends)."""
    return standing(row.payload, row.aggregate, await db.aggregate_state(conn, row.aggregate))


async def run_outbox(args: argparse.Namespace, settings: Settings, endpoints: Endpoints) -> int:
    if args.action == "republish":
        return await _republish(args, endpoints)
    async with database(endpoints) as conn:
        rows = await db.list_set_aside(conn, args.limit)
        standings = [await _standing(conn, row) for row in rows]
    if args.json:
        print(json.dumps([_row_json(r, s) for r, s in zip(rows, standings, strict=True)]))
        return EXIT_OK
    if not rows:
        print("no outbound events set aside", file=sys.stderr)
        return EXIT_OK
    print(
        table(
            ["ID", "SET ASIDE", "REASON", "SUBJECT", "BYTES", "STANDING", "REPUBLISHED", "ERROR"],
            [
                [
                    str(r.id),
                    stamp(r.set_aside_at),
                    r.reason,
                    r.subject,
                    str(len(r.payload)),
                    s,
                    stamp(r.republished_at) if r.republished_at else "-",
                    " ".join(r.error.split()),
                ]
                for r, s in zip(rows, standings, strict=True)
            ],
        )
    )
    return EXIT_OK


async def _republish(args: argparse.Namespace, endpoints: Endpoints) -> int:
    refused = False
    queued: dict[int, db.SetAsideRow] = {}  # by the new outbox id
    async with database(endpoints) as conn:
        for set_aside_id in dict.fromkeys(args.ids):
            try:
                outcome = await _put_back(conn, set_aside_id)
            except asyncpg.InsufficientPrivilegeError as err:
                raise CommandFailed(
                    EXIT_FAILURE,
                    f"cannot republish outbox row {set_aside_id} ({err}): apply "
                    "sql/grants.sql (`hub-worker migrate` with HUB_DATABASE_RUNTIME_ROLE)",
                ) from None
            if isinstance(outcome, str):
                error("outbox", outcome)
                refused = True
                continue
            new_id, row = outcome
            queued[new_id] = row
            print(
                f"republished outbox row {row.id} ({row.reason}) as outbox row {new_id}, "
                f"eventId {row.event_id}, to {row.subject}",
                flush=True,
            )
        again = False if args.no_wait else await _await_relay(conn, queued, args.wait)
    if again:
        return EXIT_FAILURE
    return EXIT_REFUSED if refused else EXIT_OK


async def _put_back(conn: db.Connection, set_aside_id: int) -> tuple[int, db.SetAsideRow] | str:
    """Row `set_aside_id` back into the outbox, in one transaction: (its new outbox
    id, the row), or why not."""
    async with conn.transaction():
        row = await db.lock_set_aside(conn, set_aside_id)
        if row is None:
            return f"no outbox row set aside with id {set_aside_id}"
        if row.republished_at is not None:
            return (
                f"outbox row {row.id} was republished at {stamp(row.republished_at)}; "
                "set aside again, it is a new row (`hub-worker outbox`)"
            )
        state = await _standing(conn, row)
        if state not in REPUBLISHABLE:
            return (
                f"outbox row {row.id} is {state}: its {row.aggregate} changed since, and "
                "subscribers were sent the newer state"
                if state == "superseded"
                else f"outbox row {row.id} is {state}: not an event the worker wrote"
            )
        new_id = await db.republish_set_aside(conn, row.id)
        assert new_id is not None  # the row is locked and was not republished
        return new_id, row


async def _await_relay(conn: db.Connection, queued: dict[int, db.SetAsideRow], wait: float) -> bool:
    """Say what the relay did with the republished rows within `wait` seconds; True when
    one was set aside again."""
    deadline = time.monotonic() + wait
    waiting = dict(queued)
    again = False
    while waiting:
        for outcome in await db.republished_outcome(conn, list(waiting)):
            if outcome.pending:
                continue
            row = waiting.pop(outcome.id)
            if outcome.reason is None:
                print(f"published outbox row {outcome.id} (was {row.id})", flush=True)
            else:
                again = True
                error(
                    "outbox",
                    f"outbox row {outcome.id} (was {row.id}) was set aside again: "
                    f"{outcome.reason} ({outcome.error})",
                )
        if not waiting or time.monotonic() >= deadline:
            break
        await asyncio.sleep(OUTCOME_POLL_SECONDS)
    for new_id in waiting:
        print(
            f"outbox row {new_id} is not published yet (is a worker running?): "
            "the relay publishes it when one runs",
            flush=True,
        )
    return again
